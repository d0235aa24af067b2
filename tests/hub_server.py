"""A small Hugging Face Hub-compatible HTTP server (stdlib only) for tests on machines without the Hub.

It answers the part of the Hub API that the unmodified `huggingface_hub` client uses for
`create_repo`, `create_branch`, `upload_folder` / `create_commit` (pre-upload with every file
"regular", NDJSON commit), `model_info`, `list_repo_refs`, `list_repo_tree` (also recursive),
`hf_hub_download` / `snapshot_download` (HEAD + GET `resolve` with ETag, X-Repo-Commit,
Content-Length) and `/api/validate-yaml`. Errors carry the `X-Error-Code` header the client turns
into `RepositoryNotFoundError`, `RevisionNotFoundError` and `EntryNotFoundError`.

Storage is in memory. Blob, tree and commit ids are real git object ids (sha1), so every commit
has its own stable 40-hex sha, as on the Hub. Private repos are only visible with the owner's
token (`Authorization: Bearer ...`); writes always need the namespace owner's token.

Run standalone with `python tests/hub_server.py --port 8123 --token hf_user:user`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"

# The parts of the Hub's model-card metadata schema that spp-hf cards use.
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
KNOWN_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "h-research",
    "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0", "odc-by", "odbl",
    "openmdw-1.0", "openrail++", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
    "lgpl-lr", "deepfloyd-if-license", "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
}  # fmt: skip
REPO_ID_RE = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]{1,96}$")


# --------------------------------------------------------------------------- git object ids
def _git_object_id(kind: bytes, data: bytes) -> str:
    return hashlib.sha1(kind + b" %d\0" % len(data) + data).hexdigest()


def git_blob_id(data: bytes) -> str:
    """The git blob id of a file's content (what the Hub reports as a regular file's oid/ETag)."""
    return _git_object_id(b"blob", data)


def _nested(files: dict[str, bytes]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, data in files.items():
        node = root
        *dirs, name = path.split("/")
        for part in dirs:
            node = node.setdefault(part, {})
        node[name] = data
    return root


def _tree_id(node: dict[str, Any]) -> str:
    entries = []
    for name, child in node.items():
        is_dir = isinstance(child, dict)
        oid = _tree_id(child) if is_dir else git_blob_id(child)
        entries.append((name + "/" if is_dir else name, b"40000" if is_dir else b"100644", name, oid))
    data = b"".join(mode + b" " + name.encode() + b"\0" + bytes.fromhex(oid) for _, mode, name, oid in sorted(entries))
    return _git_object_id(b"tree", data)


def git_tree_id(files: dict[str, bytes], prefix: str = "") -> str:
    """The git tree id of the folder `prefix` ("" for the root) of a snapshot."""
    node = _nested(files)
    for part in [p for p in prefix.split("/") if p]:
        node = node[part]
    return _tree_id(node)


# --------------------------------------------------------------------------- storage
@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    timestamp: int


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    def commit(self, branch: str, files: dict[str, bytes], message: str, author: str) -> Commit:
        parent = self.branches.get(branch)
        timestamp = int(time.time())
        body = f"tree {git_tree_id(files)}\n"
        if parent:
            body += f"parent {parent}\n"
        body += f"author {author} <{author}@users.noreply.hf.co> {timestamp} +0000\n"
        body += f"committer {author} <{author}@users.noreply.hf.co> {timestamp} +0000\n\n{message}\n"
        oid = _git_object_id(b"commit", body.encode())
        commit = Commit(oid, parent, message, dict(files), timestamp)
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit

    def resolve(self, revision: str) -> Commit | None:
        """A branch name, a full commit sha or an unambiguous sha prefix (7+ characters)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


class HubState:
    """All repos of the fake Hub, plus which token belongs to which user."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []

    def create(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit", repo.owner)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]


# --------------------------------------------------------------------------- card metadata validation
def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """Errors and warnings for a README's YAML block, for the fields the Hub's schema checks that we use."""
    match = re.match(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))", content)
    if not match:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        data = yaml.safe_load(match.group(2)) or {}
    except yaml.YAMLError as err:
        return [f"YAML parse error: {err}"], []
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"], []
    errors: list[str] = []

    def str_or_list(key: str) -> list[str]:
        value = data.get(key)
        values = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
            errors.append(f'"{key}" must be a string or a list of strings')
            return []
        return values or []

    for base in str_or_list("base_model"):
        if not REPO_ID_RE.match(base):
            errors.append(f'"base_model" must be a Hub model id, got {base!r}')
    relation = data.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}, got {relation!r}')
        if "base_model" not in data:
            errors.append('"base_model_relation" needs "base_model"')
    for lic in str_or_list("license"):
        if lic not in KNOWN_LICENSES:
            errors.append(f'"license" must be a license identifier from the Hub list, got {lic!r}')
    str_or_list("datasets")
    str_or_list("language")
    if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
        errors.append('"tags" must be a list of strings')
    for key in ("library_name", "pipeline_tag", "license_name", "license_link"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if "model-index" in data:
        errors.extend(_validate_model_index(data["model-index"]))
    return errors, []


def _validate_model_index(index: Any) -> list[str]:
    if not isinstance(index, list) or not index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for model in index:
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append('"model-index" entries need a "name"')
            continue
        results = model.get("results")
        if not isinstance(results, list) or not results:
            errors.append('"model-index[].results" must be a non-empty list')
            continue
        for result in results:
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append('"results[].task.type" is required')
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                errors.append('"results[].dataset" needs "type" and "name"')
            if not isinstance(metrics, list) or not metrics:
                errors.append('"results[].metrics" must be a non-empty list')
                continue
            for metric in metrics:
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append('"metrics[]" entries need "type" and "value"')
    return errors


# --------------------------------------------------------------------------- HTTP
class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


API_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$")
RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the per-request log
        pass

    # -- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, body: bytes | None = None) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self.state.lock:
            self.state.requests.append((self.command, split.path))
        body = self._body() if self.command in ("POST", "PUT") else b""
        try:
            self._route(split.path, query, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch  # noqa: N815

    # -- access
    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.state.repos.get((repo_type, repo_id))
        if write:
            self._check_write(user, repo_id.split("/")[0])
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _check_write(user: str | None, namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub (pass a token)")
        if user != namespace:
            raise HubError(403, f"You don't have the rights to write to the {namespace} namespace")

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    # -- routes
    def _route(self, path: str, query: dict[str, str], body: bytes) -> None:
        if path == "/api/repos/create" and self.command == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and self.command == "POST":
            errors, warnings = validate_card_metadata(json.loads(body or b"{}").get("content", ""))
            status = 400 if errors else 200
            answer = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
            return self._send(status, answer)
        if path == "/api/whoami-v2":
            user = self._user()
            if user is None:
                raise HubError(401, "Invalid username or password.")
            return self._send(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        match = API_RE.match(path)
        if match:
            repo_type, repo_id, rest = REPO_TYPES[match.group(1)], match.group(2), match.group(3) or ""
            return self._api(repo_type, repo_id, rest, query, body)
        match = RESOLVE_RE.match(path)
        if match and self.command in ("GET", "HEAD"):
            repo_type = REPO_TYPES[match.group(1)] if match.group(1) else "model"
            return self._resolve(repo_type, match.group(2), match.group(3), unquote(match.group(4)))
        raise HubError(404, f"No route for {self.command} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        user = self._user()
        namespace = payload.get("organization") or user
        self._check_write(user, namespace or "")
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        if not REPO_ID_RE.match(repo_id):
            raise HubError(400, f"Invalid repo name {repo_id!r}")
        url = f"{self.base_url}/{URL_PREFIX[repo_type]}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.state.create(repo_type, repo_id, private=private)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api(self, repo_type: str, repo_id: str, rest: str, query: dict[str, str], body: bytes) -> None:
        verb, _, arg = rest.partition("/")
        if self.command == "GET" and verb in ("", "revision"):
            repo = self._repo(repo_type, repo_id)
            return self._info(repo, self._commit(repo, arg or "main"))
        if self.command == "GET" and verb == "refs":
            repo = self._repo(repo_type, repo_id)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(repo.branches.items())]
            return self._send(200, {"branches": branches, "tags": [], "converts": []})
        if self.command == "GET" and verb == "tree":
            revision, _, folder = arg.partition("/")
            repo = self._repo(repo_type, repo_id)
            return self._tree(repo, self._commit(repo, revision), unquote(folder).strip("/"), query)
        if self.command == "POST" and verb == "preupload":
            repo = self._repo(repo_type, repo_id, write=True)
            commit = self._commit(repo, arg)
            files = json.loads(body)["files"]
            answer = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_id(commit.files[f["path"]]) if f["path"] in commit.files else None}
                for f in files
            ]  # fmt: skip
            return self._send(200, {"files": answer, "commitOid": commit.oid})
        if self.command == "POST" and verb == "commit":
            return self._create_commit(self._repo(repo_type, repo_id, write=True), unquote(arg), query, body)
        if self.command == "POST" and verb == "branch":
            repo = self._repo(repo_type, repo_id, write=True)
            branch = unquote(arg)
            with self.state.lock:
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[branch] = self._commit(repo, start).oid
            return self._send(200, {})
        raise HubError(404, f"No route for {self.command} /api/{repo_type}s/{repo_id}/{rest}")

    def _info(self, repo: Repo, commit: Commit) -> None:
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.timestamp)),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.timestamp)),
            "siblings": [{"rfilename": name} for name in sorted(commit.files)],
        }
        readme = commit.files.get("README.md")
        if readme is not None:
            match = re.match(r"^\s*---\r?\n([\S\s]*?)\r?\n---", readme.decode("utf-8", "replace"))
            if match:
                try:
                    info["cardData"] = yaml.safe_load(match.group(1)) or {}
                except yaml.YAMLError:
                    pass
        self._send(200, info)

    def _tree(self, repo: Repo, commit: Commit, folder: str, query: dict[str, str]) -> None:
        recursive = query.get("recursive", "false").lower() in ("true", "1")
        prefix = folder + "/" if folder else ""
        if folder and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        entries: dict[str, dict[str, Any]] = {}
        for path, data in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                sub = prefix + "/".join(parts[:i])
                entries[sub] = {"type": "directory", "oid": git_tree_id(commit.files, sub), "size": 0, "path": sub}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
        self._send(200, [entries[k] for k in sorted(entries)])

    def _create_commit(self, repo: Repo, branch: str, query: dict[str, str], body: bytes) -> None:
        if query.get("create_pr"):
            raise HubError(400, "This test server does not support pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self.state.lock:
            if branch not in repo.branches:
                if repo.resolve(branch) is not None:
                    raise HubError(400, f"Cannot commit to {branch}: not a branch")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}: this server only takes regular uploads")
            message = header.get("summary") or "Update"
            if header.get("description"):
                message += "\n\n" + header["description"]
            commit = repo.commit(branch, files, message, self._user() or repo.owner)
        url = f"{self.base_url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        self._send(200, {"success": True, "commitOid": commit.oid, "commitUrl": url})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        data = commit.files.get(filename)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_id(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, headers=headers, body=data)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), Handler)
        self.state = state


class HubServer:
    """Start/stop wrapper: `HubServer(tokens={"hf_x": "user"}).start()` serves on a free port in a thread."""

    def __init__(self, tokens: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0):
        self.state = HubState(tokens or {})
        self.httpd = HubHTTPServer(self.state, host, port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--token", action="append", default=[], help="TOKEN:USER, repeatable")
    args = parser.parse_args()
    server = HubServer(dict(t.split(":", 1) for t in args.token), args.host, args.port)
    print(f"serving a Hub-compatible API on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
