"""Hub I/O: push adapters, pruned bases and merged models; download adapters with errors that name the fix.

Everything goes through `huggingface_hub` (`HfApi.create_repo` / `create_branch` / `upload_folder`,
`snapshot_download`), so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and the cache behave as everywhere else
in the Hugging Face stack.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import get_token

from safetensors import safe_open

from ..adapters.config import AdapterConfig
from ..adapters.kinds import KINDS
from ..sparsity import zero_mask_differences
from ..storage import (
    ADAPTER_FILES,
    AdapterFiles,
    CONFIG_NAME,
    PeftAdapterFiles,
    README_NAME,
    SPARSE_PEFT_FILES,
    SPARSE_PEFT_NAME,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    atomic_write_bytes,
    is_sparse_peft_folder,
    json_bytes,
    read_adapter_folder,
    read_sparsity_json,
    sparsity_fingerprint,
    write_adapters,
)
from .cards import PLACEHOLDER_REPO_ID, fill_repo_id, render_adapter_card, render_sparse_peft_card, sparse_peft_label
from .paths import is_hub_id, strip_local_paths, without_local_paths

# Small files that tell what else a repo holds when it is not an SPP adapter.
KIND_HINT_FILES = ("adapter_config.json", "config.json", SPARSITY_NAME)
# Hidden entries of a folder a user saves into (a clone's `.git`, `.env`) are theirs, never uploaded.
HIDDEN_PATTERNS = (".*", "*/.*")


class SPPHubError(OSError):
    """A Hub repo or revision could not be used; the message says why and what to do."""


# --------------------------------------------------------------------------- push
def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    *,
    create_pr: bool = False,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
) -> Any:
    """Upload a folder (pruned base, adapter or merged model) to a Hub repo in one commit that mirrors it.

    Creates the repo (and the `revision` branch) if missing. The commit deletes the repo's files that the
    folder lacks (a re-push that went from one weights file to shards must not leave the old weights beside
    the new sparsity.json), except `.gitattributes`; with `allow_patterns`, only files matching them are
    mirrored. Hidden entries of the folder (`.git`, `.env`, ...) are never uploaded. A README.md that still names the
    cards' placeholder repo id is uploaded with `repo_id` filled in, and paths of this machine in the
    card and sparsity.json are left out (`_public_view`; the folder itself is not changed).
    Returns the `CommitInfo` (a `str`: the commit url; `.oid` is the commit sha).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the model/adapter there first (save_pretrained).")
    api = HfApi(token=token)
    with _push_errors(repo_id, token):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with _public_view(folder, repo_id) as upload_dir:
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=upload_dir,
                revision=revision,
                commit_message=commit_message or f"Upload {describe_folder(folder)} with spp-hf",
                allow_patterns=allow_patterns,
                ignore_patterns=[*HIDDEN_PATTERNS, *_as_list(ignore_patterns)],
                delete_patterns=allow_patterns or "*",
                create_pr=create_pr,
            )


def _as_list(patterns: list[str] | str | None) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def split_revision(name: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None)."""
    repo, sep, revision = name.partition("@")
    return repo, (revision or None) if sep else None


def verified_base(
    base: str,
    revision: str | None,
    mask_fingerprint: dict | None,
    token: str | bool | None = None,
    *,
    trained_on: bool = False,
) -> str:
    """The commit sha of `base` at `revision` (default: main now), after checking it has the adapter's zeros.

    The check reads the mask fingerprint that base's `sparsity.json` records at that commit (every
    model folder spp-hf writes has one), so what the Hub now serves is what the adapter was trained on.
    A base pruned by someone else has no sparsity.json: with `trained_on` (the adapter recorded `revision`
    as the commit its base was loaded from) that commit is pinned as is; its zeros are checked against the
    base's weights when the adapter is loaded.
    """
    if not is_hub_id(base):
        raise SPPHubError(f"{base!r} is not a Hub repo id; pass the pruned base's repo as ORG/NAME[@REVISION].")
    try:
        sha = HfApi(token=token).model_info(base, revision=revision, token=token).sha
    except (HfHubHTTPError, OfflineModeIsEnabled) as err:
        raise SPPHubError(explain_hub_error(err, base, revision, token, role="base")) from err
    if not mask_fingerprint:
        return sha
    served = sparsity_fingerprint(fetch_sparsity_json(base, sha, token))
    if served is None:
        if trained_on and revision == sha:
            return sha
        raise SPPHubError(
            f"The base {base!r} at {sha[:12]} has no {SPARSITY_NAME} with a mask fingerprint, and the adapter does not "
            "record that it was trained on this commit, so its zeros cannot be checked before pushing. Load the base "
            f"from the Hub at a commit (from_pretrained({base!r}, revision=COMMIT)) and train the adapter there: the "
            "adapter then records the commit, which is pinned as is and checked against the base's weights when the "
            "adapter is loaded. (A base pushed by spp-hf has a sparsity.json and needs neither.)"
        )
    problems = zero_mask_differences(mask_fingerprint, served)
    if problems:
        raise SPPHubError(
            f"The base {base!r} at {sha[:12]} does not have the adapter's zeros in {len(problems)} layers "
            f"({'; '.join(problems[:3])}). Pass the repo and revision of the pruned base the adapter was trained on."
        )
    return sha


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    base: str | None = None,
    private: bool | None = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    *,
    create_pr: bool = False,
) -> Any:
    """Upload a saved adapter (SPP, masked LoRA or sparse PEFT, and its named sub-adapters) keyed to a base others
    can download.

    `base` ("ORG/NAME" or "ORG/NAME@REV") re-keys the adapter to that repo at the commit the revision
    names now. Without it, the base the adapter records is used; a local path there is refused, since
    nobody else could load it. Either way the base's mask fingerprint on the Hub is checked first and
    the pushed config (`spp_config.json`, or a sparse-PEFT adapter's record and `adapter_config.json`) pins its
    commit. The local folder is not changed.
    """
    folder = Path(folder)
    names = ([""] if is_adapter_root(folder) else []) + _named_adapters(folder)
    if not names:
        raise FileNotFoundError(
            f"{folder} holds no {CONFIG_NAME} or {SPARSE_PEFT_NAME}: save the adapter there first (model.save_pretrained)."
        )
    base_name, base_rev = split_revision(base) if base else (None, None)
    adapters = {}
    for name in names:
        files = read_adapter_folder(folder / name if name else folder)
        recorded, recorded_rev = files.base
        target = base_name or recorded
        if not is_hub_id(target):
            raise SPPHubError(
                f"The adapter in {folder / name} names its base as {recorded!r}, which is not a Hub repo, so "
                f"SPPModel.from_pretrained({repo_id!r}) would fail for everyone else. Push the pruned base first and "
                "pass it: `spp-hf push ADAPTER REPO --base ORG/NAME[@REVISION]` (push_adapter_folder(..., base=...)), "
                "or publish the whole run with `spp-hf publish RUN_DIR ORG/NAME`."
            )
        rev = base_rev if base_name else recorded_rev
        trained_on = (target, rev) == (recorded, recorded_rev)
        sha = verified_base(target, rev, files.mask_fingerprint, token, trained_on=trained_on)
        adapters[name] = rekeyed(files, target, sha, repo_id if not name else None)
    with tempfile.TemporaryDirectory(prefix="spp-adapter-push-") as tmp:
        staged = write_adapters(Path(tmp) / "adapter", adapters)
        message = commit_message or f"Upload {describe_folder(staged)}"
        return push_folder(staged, repo_id, private, revision, message, token, create_pr=create_pr)


def is_adapter_root(folder: Path) -> bool:
    """Whether `folder` itself holds an adapter spp-hf saved (SPP's config, or a sparse-PEFT adapter's record)."""
    return (folder / CONFIG_NAME).is_file() or is_sparse_peft_folder(folder)


def _named_adapters(folder: Path) -> list[str]:
    """Sub-folders holding a named adapter saved with the model (not a Trainer's checkpoint-N beside it): an SPP
    adapter's weights record its name, which is the folder's name; a sparse-PEFT adapter's folder is a sibling of
    the "default" one at the root, as PEFT lays them out."""
    names = []
    for path in sorted(folder.glob(f"*/{WEIGHTS_NAME}")):
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("spp_adapter") == path.parent.name and (path.parent / CONFIG_NAME).is_file():
                names.append(path.parent.name)
    if is_sparse_peft_folder(folder):
        names += [p.parent.name for p in sorted(folder.glob(f"*/{SPARSE_PEFT_NAME}")) if not p.parent.name.startswith(".")]
    return names


def rekeyed(files: AdapterFiles | PeftAdapterFiles, base: str, sha: str, repo_id: str | None) -> AdapterFiles | PeftAdapterFiles:
    """An adapter's files pointing at `base`@`sha`. Its own card is kept when the adapter already named exactly
    that base and commit (a Trainer's card with the training details); otherwise a card is rendered for the new base."""
    if files.base == (base, sha) and files.card is not None:
        return files
    moved = files.rekeyed(base, sha)
    moved.card = adapter_card(moved, repo_id)
    return moved


def adapter_card(files: AdapterFiles | PeftAdapterFiles, repo_id: str | None, **kwargs: Any) -> str:
    """The card of an adapter's files, of its format (`render_adapter_card` / `render_sparse_peft_card`)."""
    if isinstance(files, PeftAdapterFiles):
        return render_sparse_peft_card(files.record, files.config, repo_id=repo_id, **kwargs)
    return render_adapter_card(AdapterConfig.from_dict(files.config), repo_id=repo_id, **kwargs)


def push_adapter(
    model: Any,
    repo_id: str,
    folder: str | os.PathLike | None = None,
    private: bool | None = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    *,
    create_pr: bool = False,
    base: str | None = None,
) -> Any:
    """Save an SPP model's adapter(s) (into `folder`, or a temp folder) and upload them (`push_adapter_folder`).

    The base weights are never uploaded: the adapter's `spp_config.json` names the base repo and
    commit, which `SPPModel.from_pretrained` downloads. `base` re-keys a base loaded from a local folder.
    """
    with nullcontext(folder) if folder is not None else tempfile.TemporaryDirectory(prefix="spp-adapter-") as target:
        model.save_pretrained(target)
        return push_adapter_folder(target, repo_id, base, private, revision, commit_message, token, create_pr=create_pr)


def base_commit(name: str, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """The commit sha a base loaded from the Hub came from, to pin it in an adapter's config.

    transformers 5 no longer sets `config._commit_hash`, but `from_pretrained` records the commit it
    resolved a revision to in the cache (`refs/<revision>`). With `revision` that ref is read, else
    the Hub is asked (with a warning: the base may have changed since it was loaded). Without
    `revision` the load's revision is unknown, so it is never assumed to be main: the cache must hold
    exactly one commit of the repo; otherwise None is returned with a warning saying how to pin it.
    None for local folders.
    """
    if not is_hub_id(name):
        return None
    if revision is None:
        commits = _cached_commits(name)
        if len(commits) == 1:
            return commits.pop()
        warnings.warn(
            f"The revision base {name!r} was loaded from is unknown ({len(commits)} commits of it in the cache), so the "
            "adapter records none. Set config.base_model_revision, or push with `spp-hf push ADAPTER REPO --base "
            f"{name}@REVISION`, which pins the commit after checking its zeros.",
            stacklevel=3,
        )
        return None
    api = HfApi(token=token)
    try:
        return api.resolve_revision(name, revision=revision, local_files_only=True).resolved
    except RevisionResolutionError:
        pass
    try:
        sha = api.resolve_revision(name, revision=revision).resolved
    except (HfHubHTTPError, RevisionResolutionError, OfflineModeIsEnabled):
        return None
    warnings.warn(
        f"Pinned the adapter's base {name!r} to the current commit {sha[:12]} of {revision!r} (the loaded commit was not "
        "in the cache); if the base changed since you loaded it, set config.base_model_revision yourself.",
        stacklevel=3,
    )
    return sha


def _cached_commits(name: str) -> set[str]:
    """Commits of a model repo in the HF cache: those its refs name, else its snapshot folders."""
    repo = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
    commits = {p.read_text().strip() for p in (repo / "refs").rglob("*") if p.is_file()} if (repo / "refs").is_dir() else set()
    if not commits and (repo / "snapshots").is_dir():
        commits = {p.name for p in (repo / "snapshots").iterdir() if p.is_dir()}
    return commits


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder holds an adapter saved by spp-hf (any kind: SPP, masked LoRA, sparse PEFT), itself or as
    named sub-folders."""
    folder = Path(folder)
    return is_adapter_root(folder) or bool(_named_adapters(folder))


def describe_folder(folder: str | os.PathLike) -> str:
    """What a folder holds, from its files: "<kind label> adapter" (e.g. "SPP adapter", "Masked-LoRA adapter",
    "sparse-PEFT masked LoRA adapter"), "SPP-merged model", "merged model", "pruned base" or "model"."""
    folder = Path(folder)
    if is_sparse_peft_folder(folder):
        try:
            record = json.loads((folder / SPARSE_PEFT_NAME).read_bytes())
        except ValueError:
            record = None
        return f"sparse-PEFT {sparse_peft_label(record)} adapter" if isinstance(record, dict) else "sparse-PEFT adapter"
    if (folder / CONFIG_NAME).is_file():
        try:
            method = json.loads((folder / CONFIG_NAME).read_bytes()).get("method", "spp")
        except (ValueError, AttributeError):
            method = None
        kind = KINDS.get(method) if isinstance(method, str) else None
        return f"{kind.label} adapter" if kind else "adapter"
    data = read_sparsity_json(folder)
    if data is not None:
        return {"spp-merged": "SPP-merged model", "merged": "merged model"}.get(data.get("kind"), "pruned base")
    return "model"


@contextmanager
def _public_view(folder: Path, repo_id: str) -> Iterator[Path]:
    """`folder`, or a mirror of it (files symlinked) fit for the Hub: the card names `repo_id` instead of the
    placeholder, and paths of this machine in the card and sparsity.json are dropped (with a warning)."""
    rewritten: dict[str, bytes] = {}
    card_paths: list[str] = []
    json_paths: list[str] = []
    readme = folder / README_NAME
    if readme.is_file():
        text, card_paths = strip_local_paths(readme.read_text(encoding="utf-8"))
        if card_paths or PLACEHOLDER_REPO_ID in text:
            rewritten[README_NAME] = fill_repo_id(text, repo_id).encode("utf-8")
    data = read_sparsity_json(folder / SPARSITY_NAME)
    if data is not None:
        public, json_paths = without_local_paths(data)
        if json_paths:
            rewritten[SPARSITY_NAME] = json_bytes(public)
    if not rewritten:
        yield folder
        return
    dropped = sorted(set(card_paths) | set(json_paths))
    if dropped:
        warnings.warn(f"Not publishing paths of this machine found in {folder}: {dropped[:3]}", stacklevel=4)
    with tempfile.TemporaryDirectory(prefix="spp-upload-") as tmp:
        mirror = Path(tmp)
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != ".git"]
            target = mirror / Path(root).relative_to(folder)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                if Path(root) == folder and name in rewritten:
                    atomic_write_bytes(target / name, rewritten[name])
                else:
                    os.symlink(Path(root).resolve() / name, target / name)
        yield mirror


@contextmanager
def _push_errors(repo_id: str, token: str | bool | None) -> Iterator[None]:
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            how = "the token you passed" if token else ("your saved token / HF_TOKEN" if _has_token(token) else "no token")
            raise SPPHubError(
                f"Pushing to {repo_id!r} on {constants.ENDPOINT} was refused (HTTP {status}) with {how}. "
                "Pass a token with write access to that namespace (token=..., HF_TOKEN, or `hf auth login`)."
            ) from err
        raise


# --------------------------------------------------------------------------- download
def download_adapter(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Local snapshot (in the HF cache) of an spp-hf adapter repo (SPP, masked LoRA or sparse PEFT): only the
    adapter files are downloaded.

    Honours HF_HUB_OFFLINE and the cache. Raises `SPPHubError` naming the fix when the repo is
    missing or private, the revision does not exist, the cache lacks it offline, or the repo holds
    something other than an spp-hf adapter (a plain PEFT/LoRA adapter, a full or pruned model).
    """
    folder = fetch_adapter_files(repo_id, revision, token, cache_dir=cache_dir, local_files_only=local_files_only)
    if not is_adapter_root(folder):
        raise SPPHubError(_not_an_adapter_message(folder, repo_id, revision))
    return folder


def fetch_adapter_files(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Local snapshot of the small files of a repo that may hold an adapter (spp-hf's and PEFT's adapter files and
    the files that tell what else it holds), whatever it holds; `download_adapter` checks it is an adapter."""
    _check_repo_id(repo_id, "SPP adapter")
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                allow_patterns=[*ADAPTER_FILES, *SPARSE_PEFT_FILES, *KIND_HINT_FILES],
            )  # fmt: skip
        )
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled) as err:
        raise SPPHubError(explain_hub_error(err, repo_id, revision, token, role="adapter")) from err


def resolve_adapter(path_or_repo: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local adapter directory, or the local snapshot of an adapter repo on the Hub."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    return download_adapter(str(path_or_repo), **hub_kwargs)


def explain_hub_error(err: BaseException, repo_id: str, revision: str | None, token: str | bool | None, role: str) -> str:
    """A message for a huggingface_hub error that says what went wrong with which repo and what to do."""
    what = {"adapter": "SPP adapter", "base": "pruned base model"}.get(role, "model")
    at = f" (revision {revision!r})" if revision else ""
    base_fix = (
        " If the base lives elsewhere, pass base_model=<local folder or repo id> (and base_revision=...) to "
        "SPPModel.from_pretrained."
        if role == "base"
        else ""
    )
    if isinstance(err, GatedRepoError):
        return (
            f"The {what} repo {repo_id!r} is gated: request access on its Hub page, then pass a token that has it "
            f"(token=..., HF_TOKEN, or `hf auth login`).{base_fix}"
        )
    if isinstance(err, RepositoryNotFoundError):
        if _has_token(token):
            auth = "or the token used has no access to it (it may be private to another account)"
        else:
            auth = "or it is private and no token was given: pass token=..., set HF_TOKEN, or run `hf auth login`"
        fix = " Check the repo id" + (", or push the pruned base (spp-hf prune ... --push-to-hub)." if role == "base" else ".")
        return f"The {what} repo {repo_id!r} was not found on {constants.ENDPOINT}, {auth}.{fix}{base_fix}"
    if isinstance(err, RevisionNotFoundError):
        moved = (
            " The adapter pins this base revision; if the base repo's history was rewritten, pass base_revision=... "
            "(the mask-fingerprint check then tells whether that revision still has the adapter's zeros)."
            if role == "base"
            else " List the branches with HfApi().list_repo_refs(repo_id) and pass revision=<branch or commit>."
        )
        return f"The {what} repo {repo_id!r} has no revision {revision!r}.{moved}"
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.is_offline_mode():
            return (
                f"HF_HUB_OFFLINE is set and the {what} {repo_id!r}{at} is not in the cache ({constants.HF_HUB_CACHE}). "
                "Download it once while online (or copy the cache), or unset HF_HUB_OFFLINE."
            )
        return (
            f"Could not reach {constants.ENDPOINT} to download the {what} {repo_id!r}{at}, and it is not in the cache "
            f"({constants.HF_HUB_CACHE}). Check the connection, or download it once and use HF_HUB_OFFLINE=1."
        )
    if isinstance(err, EntryNotFoundError):
        return f"A file of the {what} {repo_id!r}{at} is missing on the Hub ({err}); the upload is incomplete: push it again."
    if isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code == 401:
        return f"{constants.ENDPOINT} rejected the token used for {repo_id!r}: pass a valid token (token=..., HF_TOKEN)."
    return f"Could not download the {what} {repo_id!r}{at}: {err}"


@contextmanager
def base_model_errors(name: str, revision: str | None = None, token: str | bool | None = None) -> Iterator[None]:
    """Re-raise a failed base download (transformers wraps Hub errors in OSError) as an `SPPHubError` naming the fix.

    Used around `AutoModelForCausalLM.from_pretrained(name, revision=...)` when loading an adapter's base.
    """
    try:
        yield
    except (OSError, ValueError) as err:
        hub_err = _find_hub_error(err)
        if hub_err is None:
            raise
        if isinstance(hub_err, HFValidationError):
            raise SPPHubError(
                f"The adapter's base {name!r} is neither a local folder nor a valid Hub repo id. Pass "
                "base_model=<local folder or repo id of the pruned base> to SPPModel.from_pretrained."
            ) from err
        raise SPPHubError(explain_hub_error(hub_err, name, revision, token, role="base")) from err


def _find_hub_error(err: BaseException | None) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, HFValidationError)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _not_an_adapter_message(folder: Path, repo_id: str, revision: str | None) -> str:
    at = f" (revision {revision!r})" if revision else ""
    if (folder / "adapter_config.json").is_file():
        return (
            f"{repo_id!r}{at} holds a PEFT/LoRA adapter (adapter_config.json), not an SPP adapter (spp_config.json). "
            "Load it with peft.PeftModel.from_pretrained(base, repo_id); SPPModel only loads SPP adapters."
        )
    if (folder / SPARSITY_NAME).is_file() and (folder / "config.json").is_file():
        return (
            f"{repo_id!r}{at} is a pruned (or merged) model, not an SPP adapter: load it with "
            "AutoModelForCausalLM.from_pretrained, or train an adapter on it with get_spp_model."
        )
    if (folder / "config.json").is_file():
        return (
            f"{repo_id!r}{at} is a full model (config.json), not an SPP adapter: load it with "
            "AutoModelForCausalLM.from_pretrained, or pass it as base_model=... with an SPP adapter."
        )
    return f"{repo_id!r}{at} has no {CONFIG_NAME}, so it is not an SPP adapter. Push one with model.push_to_hub(...)."


def _check_repo_id(name: str, what: str) -> None:
    if not is_hub_id(name):
        raise FileNotFoundError(
            f"{name!r} is neither an existing local folder nor a Hub repo id ('namespace/name'); "
            f"pass the folder of a saved {what} or its repo id."
        )


def _has_token(token: str | bool | None) -> bool:
    if token is False:
        return False
    return bool(token) or get_token() is not None


# --------------------------------------------------------------------------- sparsity.json
def fetch_sparsity_json(name_or_path: str, revision: str | None = None, token: str | bool | None = None) -> dict | None:
    """sparsity.json of a local folder or Hub repo (None when it has none or cannot be reached)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return read_sparsity_json(local / SPARSITY_NAME)
    if not is_hub_id(name_or_path):
        return None
    try:
        return read_sparsity_json(hf_hub_download(name_or_path, SPARSITY_NAME, revision=revision, token=token))
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled):
        return None


