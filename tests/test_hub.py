"""Hub round trips over real HTTP: a local Hub-compatible server and the unmodified huggingface_hub client.

Prune a tiny llama and push it as a base, SPP-train it from the Hub, push the adapter, reload it on an
empty cache, pin base revisions, private repos, offline mode, merge/inspect CLI, and the error messages.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, prune_magnitude_nm_, train_steps, zero_masks
from fixtures_hub import OTHER_TOKEN, TOKEN, hub  # noqa: F401 - the fixture
from hub_server import Repo, git_blob_id, git_tree_id
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from spp_hf import SPPConfig, SPPMismatchError, SPPModel, get_spp_model
from spp_hf.hub.cards import render_pruned_base_card
from spp_hf.cli import main as cli_main
from spp_hf.hub.transfer import (
    SPPHubError,
    base_model_errors,
    download_adapter,
    push_adapter,
    push_adapter_folder,
    push_folder,
)
from spp_hf.sparsity import fingerprint_modules, iter_linear_weights, sparsity_report

BASE = "user/tiny-wanda24"
ADAPTER = "user/tiny-wanda24-spp"
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- helpers
def save_pruned_base(model: torch.nn.Module, folder: Path, method: str = "magnitude", license: str = "apache-2.0") -> Path:
    """What a pruning run writes: checkpoint + sparsity.json (report + fingerprint) + card."""
    model.save_pretrained(folder)
    report = sparsity_report(model).to_dict()
    data = {"method": method, "sparsity": "2:4", **report, "mask_fingerprint": fingerprint_modules(iter_linear_weights(model))}
    (folder / "sparsity.json").write_text(json.dumps(data))
    card = render_pruned_base_card("tiny/dense-llama", method, "2:4", "random tokens", report, None, license=license)
    (folder / "README.md").write_text(card)
    return folder


def push_base(tmp_path: Path, seed: int = 0, repo: str = BASE, private: bool = False) -> str:
    model = make_tiny_model("llama", seed=seed)
    prune_magnitude_nm_(model)
    folder = save_pruned_base(model, tmp_path / f"base-{seed}")
    return push_folder(folder, repo, private=private, token=TOKEN).oid


def trained_from_hub(base: str = BASE, token: str | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, token=token)
    model = get_spp_model(model, SPPConfig(r=4))
    train_steps(model)
    return model


def fresh_cache(hub, monkeypatch, name: str) -> Path:  # noqa: F811
    cache = hub.cache_dir.parent / name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def files_at(hub, repo: str, revision: str = "main") -> set[str]:  # noqa: F811
    return set(hub.state.repo(repo).resolve(revision).files)


# --------------------------------------------------------------------------- the server itself
def test_server_object_ids_are_git_object_ids(tmp_path):
    """Blob, tree and commit ids equal what the git binary computes for the same files (independent reference)."""
    files = {"a.txt": b"hello\n", "sub/b.bin": bytes(range(256)), "sub/deeper/c.json": b"{}", "z": b""}
    for path, data in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)

    def git(*args: str, **env: str) -> str:
        run = subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env})  # fmt: skip
        return run.stdout.strip()

    git("init", "-q")
    git("add", "-A")
    assert git_tree_id(files) == git("write-tree")
    assert git_tree_id(files, "sub") == git("write-tree", "--prefix=sub/")
    assert git_blob_id(files["sub/b.bin"]) == git("hash-object", "sub/b.bin")

    repo = Repo("model", "user/x", private=False)
    commit = repo.commit("main", files, "first", "user")
    who = {"GIT_AUTHOR_NAME": "user", "GIT_AUTHOR_EMAIL": "user@users.noreply.hf.co", "GIT_COMMITTER_NAME": "user",
           "GIT_COMMITTER_EMAIL": "user@users.noreply.hf.co", "GIT_AUTHOR_DATE": f"@{commit.timestamp} +0000",
           "GIT_COMMITTER_DATE": f"@{commit.timestamp} +0000"}  # fmt: skip
    assert commit.oid == git("commit-tree", git_tree_id(files), "-m", "first", **who)
    second = repo.commit("main", {**files, "a.txt": b"changed"}, "second", "user")
    assert second.parent == commit.oid and repo.resolve("main") is second and repo.resolve(commit.oid[:7]) is commit


# --------------------------------------------------------------------------- round trips
def test_adapter_round_trip_on_empty_cache(hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base_sha = push_base(tmp_path)
    base_model = AutoModelForCausalLM.from_pretrained(BASE)
    base_zeros = zero_masks(base_model)

    model = trained_from_hub()
    commit = push_adapter(model, ADAPTER)
    pushed = json.loads(hub.state.repo(ADAPTER).resolve("main").files["spp_config.json"])
    assert (pushed["base_model_name_or_path"], pushed["base_model_revision"]) == (BASE, base_sha)  # pinned at push
    assert files_at(hub, ADAPTER) == {".gitattributes", "spp_config.json", "spp_adapter.safetensors", "README.md"}
    assert hub.state.repo(ADAPTER).branches["main"] == commit.oid
    local_logits = copy.deepcopy(model).merge_and_unload()(IDS).logits

    cache = fresh_cache(hub, monkeypatch, "empty-cache")
    monkeypatch.delenv("HF_TOKEN")
    merged = SPPModel.from_pretrained(ADAPTER)
    torch.testing.assert_close(merged(IDS).logits, local_logits, rtol=1e-5, atol=1e-5)
    merged_zeros = zero_masks(merged)
    assert merged_zeros.keys() == base_zeros.keys()
    assert all(torch.equal(merged_zeros[k], base_zeros[k]) for k in base_zeros)
    assert (cache / "models--user--tiny-wanda24-spp").is_dir() and (cache / "models--user--tiny-wanda24").is_dir()

    card = ModelCard((Path(download_adapter(ADAPTER)) / "README.md").read_text())
    assert card.data.base_model == BASE and card.data.base_model_relation == "adapter"
    assert card.data.license == "apache-2.0"  # inherited from the base's card on the Hub
    assert {"spp", "sparse", "pruned", "magnitude", "2:4"} <= set(card.data.tags)
    assert f'SPPModel.from_pretrained("{ADAPTER}")' in card.text


def test_get_spp_model_pins_the_hub_base_revision(hub, tmp_path, monkeypatch):  # noqa: F811
    """A base loaded from the Hub is recorded with the commit it was loaded at, before any save or push."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    first_sha = push_base(tmp_path, seed=0)
    base = AutoModelForCausalLM.from_pretrained(BASE)
    push_base(tmp_path, seed=1)  # main moves on after the load
    cfg = get_spp_model(base, SPPConfig(r=4)).active_spp_config
    assert (cfg.base_model_name_or_path, cfg.base_model_revision) == (BASE, first_sha)


def test_model_push_to_hub_uploads_only_the_adapter(hub, tmp_path):  # noqa: F811
    push_base(tmp_path)
    model = trained_from_hub(token=TOKEN)
    model.push_to_hub(ADAPTER, private=True, revision="v1", commit_message="SPP adapter v1", token=TOKEN)
    repo = hub.state.repo(ADAPTER)
    assert repo.private
    assert files_at(hub, ADAPTER, "v1") == {".gitattributes", "spp_config.json", "spp_adapter.safetensors", "README.md"}
    assert files_at(hub, ADAPTER, "main") == {".gitattributes"}
    assert repo.resolve("v1").message.startswith("SPP adapter v1")
    saved = load_file_bytes(repo.resolve("v1").files["spp_adapter.safetensors"], tmp_path)
    assert saved.keys() == model.spp_state_dict().keys()
    card = ModelCard(repo.resolve("v1").files["README.md"].decode())
    assert card.data.library_name == "spp-hf" and card.data.base_model == BASE


def load_file_bytes(data: bytes, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "downloaded.safetensors"
    path.write_bytes(data)
    return load_file(path)


def test_pinned_base_revision_and_moved_base(hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    first_sha = push_base(tmp_path, seed=0)
    model = trained_from_hub()
    push_adapter(model, ADAPTER)
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits

    second_sha = push_base(tmp_path, seed=1)  # a new main revision with a different mask
    assert second_sha != first_sha and hub.state.repo(BASE).branches["main"] == second_sha
    fresh_cache(hub, monkeypatch, "cache-2")
    hub.state.requests.clear()
    merged = SPPModel.from_pretrained(ADAPTER)
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    weights = [p for m, p in hub.state.requests if p.startswith(f"/{BASE}/resolve/") and p.endswith("model.safetensors")]
    assert weights and all(f"/resolve/{first_sha}/" in p for p in weights)

    with pytest.raises(SPPMismatchError, match="mask hash"):
        SPPModel.from_pretrained(ADAPTER, base_revision="main")


def test_private_repos_need_a_token(hub, tmp_path, monkeypatch):  # noqa: F811
    push_base(tmp_path, private=True)
    model = trained_from_hub(token=TOKEN)
    push_adapter(model, ADAPTER, private=True, token=TOKEN)
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits
    fresh_cache(hub, monkeypatch, "cache-private")

    with pytest.raises(SPPHubError, match=r"(?s)not found.*private.*token"):
        SPPModel.from_pretrained(ADAPTER)
    with pytest.raises(SPPHubError, match="no access"):
        SPPModel.from_pretrained(ADAPTER, token=OTHER_TOKEN)
    merged = SPPModel.from_pretrained(ADAPTER, token=TOKEN)
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_offline_mode_loads_from_the_cache(hub, tmp_path, monkeypatch):  # noqa: F811
    """A real HF_HUB_OFFLINE=1 process (with the server stopped) merges from what an online load cached."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_base(tmp_path)
    model = trained_from_hub()
    push_adapter(model, ADAPTER)
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits
    SPPModel.from_pretrained(ADAPTER)  # fills the cache
    hub.server.stop()

    script = textwrap.dedent(
        f"""
        import sys, torch
        from spp_hf import SPPModel
        from spp_hf.hub.transfer import SPPHubError
        ids = torch.tensor({IDS.tolist()})
        torch.save(SPPModel.from_pretrained("{ADAPTER}")(ids).logits, sys.argv[1])
        try:
            SPPModel.from_pretrained("user/never-downloaded-spp")
        except SPPHubError as err:
            print("ERROR:", err)
        """
    )
    out = tmp_path / "offline-logits.pt"
    env = hub.env(HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), expected, rtol=1e-5, atol=1e-5)
    assert "ERROR: HF_HUB_OFFLINE is set" in result.stdout and "not in the cache" in result.stdout


# --------------------------------------------------------------------------- errors that name the fix
def test_download_adapter_errors(hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(SPPHubError, match="'user/missing-spp' was not found"):
        download_adapter("user/missing-spp")
    push_base(tmp_path)
    with pytest.raises(SPPHubError, match="pruned .* not an SPP adapter"):
        download_adapter(BASE)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"w": torch.zeros(2)}, lora / "adapter_model.safetensors")
    push_folder(lora, "user/tiny-lora")
    with pytest.raises(SPPHubError, match="PEFT/LoRA adapter"):
        SPPModel.from_pretrained("user/tiny-lora")
    model = trained_from_hub()
    push_adapter(model, ADAPTER)
    with pytest.raises(SPPHubError, match="has no revision 'nope'"):
        download_adapter(ADAPTER, revision="nope")
    with pytest.raises(FileNotFoundError, match="neither an existing local folder nor a Hub repo id"):
        download_adapter("./no/such/adapter/folder")


def test_base_errors_name_the_fix(hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(SPPHubError, match=r"(?s)'user/gone' was not found.*base_model="):
        with base_model_errors("user/gone"):
            AutoModelForCausalLM.from_pretrained("user/gone")
    push_base(tmp_path)
    missing = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(SPPHubError, match="base_revision="):
        with base_model_errors(BASE, missing):
            AutoModelForCausalLM.from_pretrained(BASE, revision=missing)
    # An adapter whose recorded base is gone: SPPModel.from_pretrained names that base and the way out.
    model = trained_from_hub()
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "spp_config.json").read_text())
    config["base_model_name_or_path"] = "user/deleted-base"  # what the repo says after its base was deleted
    (tmp_path / "adapter" / "spp_config.json").write_text(json.dumps(config))
    with pytest.raises(SPPHubError, match=r"(?s)'user/deleted-base' was not found"):
        push_adapter_folder(tmp_path / "adapter", ADAPTER)  # push checks the base first
    push_folder(tmp_path / "adapter", ADAPTER)
    with pytest.raises(SPPHubError, match=r"(?s)'user/deleted-base' was not found.*base_model="):
        SPPModel.from_pretrained(ADAPTER)


def test_push_needs_a_write_token_and_a_valid_card(hub, tmp_path):  # noqa: F811
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    with pytest.raises(SPPHubError, match="write access"):
        push_folder(folder, "user/no-token")
    with pytest.raises(SPPHubError, match="write access"):
        push_folder(folder, "user/wrong-namespace", token=OTHER_TOKEN)
    (folder / "README.md").write_text("---\nlicense: not-a-license\n---\n# x\n")
    with pytest.raises(ValueError, match="license"):
        push_folder(folder, "user/bad-card", token=TOKEN)
    (folder / "README.md").write_text("---\nlicense: mit\n---\nload <this-repo-id>\n")
    push_folder(folder, "user/good-card", token=TOKEN)
    assert hub.state.repo("user/good-card").resolve("main").files["README.md"].endswith(b"load user/good-card\n")
    assert (folder / "README.md").read_text().endswith("load <this-repo-id>\n")  # the local folder is untouched


# --------------------------------------------------------------------------- CLI: merge, push, inspect
def test_cli_merge_push_inspect(hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_base(tmp_path)
    base_zeros = zero_masks(AutoModelForCausalLM.from_pretrained(BASE))
    model = trained_from_hub()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert cli_main(["push", str(adapter_dir), ADAPTER]) == 0
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits

    out = tmp_path / "merged"
    assert cli_main(["merge", ADAPTER, "--out", str(out), "--push-to-hub", "user/tiny-merged"]) == 0
    assert {"config.json", "model.safetensors", "sparsity.json", "README.md"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained("user/tiny-merged")
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(zero_masks(merged)[k], base_zeros[k]) for k in base_zeros)
    card = ModelCard(hub.state.repo("user/tiny-merged").resolve("main").files["README.md"].decode())
    assert card.data.base_model == BASE and card.data.base_model_relation == "finetune"
    assert 'from_pretrained("user/tiny-merged")' in card.text

    capsys.readouterr()
    assert cli_main(["inspect", "user/tiny-merged"]) == 0
    text = capsys.readouterr().out
    assert "SPP-merged model" in text and f"base         {BASE}" in text
    assert f"[ok] has the base's zeros: all 14 layers match sparsity.json of {BASE}" in text
    assert cli_main(["inspect", ADAPTER, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "SPP adapter" and info["base"] == BASE and info["config"]["r"] == 4
    assert info["fingerprint"] == model.active_spp_config.mask_fingerprint["hash"]
    assert len(info["layers"]) == 14 and all(layer["ratio"] == 0.5 for layer in info["layers"])
    assert cli_main(["inspect", BASE]) == 0
    assert "[ok] weights match sparsity.json: 14 layers" in capsys.readouterr().out

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for item in out.iterdir():
        (tampered / item.name).write_bytes(item.read_bytes())
    tensors = load_file(tampered / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    tensors[key][tensors[key] == 0] = 1e-3  # fill the base's zeros of one layer
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    assert cli_main(["inspect", str(tampered)]) == 1
    assert "[FAIL] has the base's zeros: model.layers.0.mlp.down_proj: zero mask differs" in capsys.readouterr().out

    user = tmp_path / "user-folder"
    user.mkdir()
    (user / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        cli_main(["merge", ADAPTER, "--out", str(user)])
    assert [p.name for p in user.iterdir()] == ["notes.md"]
    (out / "notes.md").write_text("mine")
    assert cli_main(["merge", ADAPTER, "--out", str(out)]) == 0  # over the earlier merged model: allowed
    assert (out / "notes.md").read_text() == "mine" and (out / "sparsity.json").is_file()


# --------------------------------------------------------------------------- review items 2, 4, 16
def test_cli_push_keys_a_masked_lora_adapter_to_its_hub_base(hub, tmp_path, monkeypatch):  # noqa: F811
    """Review item 2: `--base` was refused for masked LoRA ("SPP adapters only") and without it the local base
    path was published unchecked."""
    from spp_hf import MaskedLoRAConfig

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = make_tiny_model("llama")
    prune_magnitude_nm_(base)
    local = save_pruned_base(base, tmp_path / "local-base")
    sha = push_folder(local, BASE, token=TOKEN).oid
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(local), MaskedLoRAConfig(r=4, target_modules="all-linear"))
    train_steps(model)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SPPHubError, match="not a Hub repo"):  # the local base path is never published
        cli_main(["push", str(tmp_path / "adapter"), "user/tiny-ml"])
    assert cli_main(["push", str(tmp_path / "adapter"), "user/tiny-ml", "--base", BASE]) == 0
    pushed = json.loads(hub.state.repo("user/tiny-ml").resolve("main").files["spp_config.json"])
    assert (pushed["method"], pushed["base_model_name_or_path"], pushed["base_model_revision"]) == ("masked_lora", BASE, sha)
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits
    fresh_cache(hub, monkeypatch, "cache-ml")
    torch.testing.assert_close(SPPModel.from_pretrained("user/tiny-ml")(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_push_mirrors_the_folder(hub, tmp_path):  # noqa: F811
    """Review item 4: a re-push that went from one weights file to shards left the old weights on the Hub."""
    base = make_tiny_model("llama")
    prune_magnitude_nm_(base)
    folder = save_pruned_base(base, tmp_path / "base")
    (folder / ".env").write_text("HF_TOKEN=secret\n")
    push_folder(folder, BASE, token=TOKEN)
    assert "model.safetensors" in files_at(hub, BASE) and ".env" not in files_at(hub, BASE)
    (folder / "model.safetensors").unlink()
    base.save_pretrained(folder, max_shard_size="20KB")
    shards = {p.name for p in folder.glob("model-*.safetensors")}
    assert len(shards) > 1
    push_folder(folder, BASE, token=TOKEN)
    files = files_at(hub, BASE)
    assert "model.safetensors" not in files and shards <= files and ".gitattributes" in files
    assert files == {p.name for p in folder.iterdir() if not p.name.startswith(".")} | {".gitattributes"}
    fresh = AutoModelForCausalLM.from_pretrained(BASE)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), base.state_dict().values()))


def test_push_an_adapter_on_a_base_spp_hf_did_not_write(hub, tmp_path, monkeypatch):  # noqa: F811
    """Review item 16: a Hub base without sparsity.json (pruned by anyone else) made every push fail."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = make_tiny_model("llama")
    prune_magnitude_nm_(base)
    base.save_pretrained(tmp_path / "third-party")  # no sparsity.json, no card: e.g. llm-compressor's output
    sha = push_folder(tmp_path / "third-party", "someone/sparse-2of4", token=OTHER_TOKEN).oid
    model = get_spp_model(AutoModelForCausalLM.from_pretrained("someone/sparse-2of4", revision=sha), SPPConfig(r=4))
    assert model.active_spp_config.base_model_revision == sha
    train_steps(model)
    model.save_pretrained(tmp_path / "adapter")
    push_adapter_folder(tmp_path / "adapter", "user/on-third-party")
    pushed = json.loads(hub.state.repo("user/on-third-party").resolve("main").files["spp_config.json"])
    assert (pushed["base_model_name_or_path"], pushed["base_model_revision"]) == ("someone/sparse-2of4", sha)
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits
    fresh_cache(hub, monkeypatch, "cache-3p")
    merged = SPPModel.from_pretrained("user/on-third-party")  # checks the zeros against the base's weights
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(zero_masks(merged)[n], m) for n, m in zero_masks(base).items())
    with pytest.raises(SPPHubError, match="does not record that it was trained on this commit"):
        push_adapter_folder(tmp_path / "adapter", "user/rekeyed", base="someone/sparse-2of4@main")
