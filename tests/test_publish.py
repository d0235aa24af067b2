"""`spp-hf publish` and `spp-hf push --base` over HTTP against the local Hub-compatible server.

The issue's "done when": a tiny `spp-hf run`, `spp-hf publish RUN ORG/NAME`, then from another directory
with an empty cache `SPPModel.from_pretrained("ORG/NAME-spp")` equals the published merged model, with
exact zeros; nothing pushed names a path of this machine.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_tiny_model, prune_magnitude_nm_
from fixtures_hub import TOKEN, hub  # noqa: F401 - the fixture
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from spp_hf import SPPModel
from spp_hf.cli import main as cli_main
from spp_hf.hub.cards import render_pruned_base_card
from spp_hf.hub.publish import publish_run, run_artifacts
from spp_hf.hub.transfer import SPPHubError, base_commit, push_adapter_folder, push_folder
from spp_hf.sparsity import fingerprint_modules, iter_linear_weights, model_sparsity_record
from spp_hf.storage import AdapterFiles, write_adapter_files_in_place, write_adapters, write_model_folder

REPO = "user/tiny-wanda24"
FAST = [
    "prune.nsamples=4", "prune.seqlen=64", "train.max_steps=2", "train.batch_size=2", "train.max_length=64",
    "train.save_steps=2", "train.max_samples=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(smollm2_dir, tmp_path_factory) -> Path:
    """A finished `spp-hf run` (prune, SPP, LoRA*; no evaluation) of a tiny Llama with SmolLM2's tokenizer."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok), "max_position_embeddings": 512}))
    root = tmp_path_factory.mktemp("publish")
    model.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    args = ["run", "--set", f"model={root / 'dense'}", "--set", f"output_dir={root / 'runs'}", "--set", "name=fast",
            "--skip", "eval"]  # fmt: skip
    for item in FAST:
        args += ["--set", item]
    assert cli_main(args) == 0
    return root / "runs" / "fast"


def empty_cache(hub, monkeypatch, name: str) -> Path:  # noqa: F811
    cache = hub.cache_dir.parent / name
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def pushed_files(hub, repo: str) -> dict[str, bytes]:  # noqa: F811
    return dict(hub.state.repo(repo).resolve("main").files)


def test_publish_run_then_load_the_adapter_anywhere(tiny_run, hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli_main(["publish", str(tiny_run), REPO]) == 0
    repos = {REPO, f"{REPO}-spp", f"{REPO}-spp-merged", f"{REPO}-lora_star-merged"}
    assert repos <= {r for _, r in hub.state.repos}

    # nothing pushed names a path of this machine
    local = {str(tiny_run.resolve()), str(tiny_run.parent.parent.resolve()), str(Path.home()), str(Path.cwd())}
    for repo in repos:
        for name, data in pushed_files(hub, repo).items():
            text = data.decode("utf-8", errors="replace")
            assert not [p for p in local if p in text], (repo, name)

    # the adapter is keyed to the base commit just pushed; every card links the others
    base_sha = hub.state.repo(REPO).branches["main"]
    config = json.loads(pushed_files(hub, f"{REPO}-spp")["spp_config.json"])
    assert (config["base_model_name_or_path"], config["base_model_revision"]) == (REPO, base_sha)
    cards = {repo: ModelCard(pushed_files(hub, repo)["README.md"].decode()) for repo in repos}
    assert (cards[f"{REPO}-spp"].data.base_model, cards[f"{REPO}-spp"].data.base_model_relation) == (REPO, "adapter")
    for merged in (f"{REPO}-spp-merged", f"{REPO}-lora_star-merged"):
        assert cards[merged].data.base_model == REPO and cards[merged].data.base_model_relation == "finetune"
        assert json.loads(pushed_files(hub, merged)["sparsity.json"])["base_model_revision"] == base_sha
    for repo, card in cards.items():
        assert all(f"/{other})" in card.text for other in repos - {repo}), repo

    # another directory, an empty cache, no token: the adapter downloads its base, checks it and merges
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("HF_TOKEN")
    cache = empty_cache(hub, monkeypatch, "empty-cache")
    from_adapter = SPPModel.from_pretrained(f"{REPO}-spp")
    published = AutoModelForCausalLM.from_pretrained(f"{REPO}-spp-merged")
    assert (cache / "models--user--tiny-wanda24").is_dir()
    ours, theirs = from_adapter.state_dict(), published.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    base = dict(iter_linear_weights(AutoModelForCausalLM.from_pretrained(REPO)))
    for name, weight in iter_linear_weights(from_adapter):
        assert torch.equal(weight == 0, base[name] == 0), name  # exactly the pruned base's zeros
    assert any((w == 0).float().mean() == 0.5 for w in base.values())

    capsys.readouterr()
    for repo in repos:  # every published folder verifies
        assert cli_main(["inspect", repo]) == 0, capsys.readouterr().out


def test_push_adapter_with_a_local_base_needs_base(tiny_run, hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    adapter = run_artifacts(tiny_run).variants["spp"].adapter
    with pytest.raises(SPPHubError, match=r"names its base as .*pruned.*--base ORG/NAME\[@REVISION\]"):
        cli_main(["push", str(adapter), f"{REPO}-spp"])
    assert ("model", f"{REPO}-spp") not in hub.state.repos

    other = make_tiny_model("llama", seed=1)  # a base whose zeros are not the adapter's
    prune_magnitude_nm_(other)
    write_model_folder(other, None, tmp_path / "other", "card", model_sparsity_record(other, "pruned-base"))
    push_folder(tmp_path / "other", "user/other-base")
    with pytest.raises(SPPHubError, match="does not have the adapter's zeros"):
        cli_main(["push", str(adapter), f"{REPO}-spp", "--base", "user/other-base"])

    first = push_folder(tiny_run / "pruned", REPO).oid
    push_folder(tmp_path / "other", REPO, revision="other")  # a branch with other zeros
    assert cli_main(["push", str(adapter), f"{REPO}-spp", "--base", f"{REPO}@main"]) == 0
    config = json.loads(pushed_files(hub, f"{REPO}-spp")["spp_config.json"])
    assert (config["base_model_name_or_path"], config["base_model_revision"]) == (REPO, first)
    with pytest.raises(SPPHubError, match="does not have the adapter's zeros"):
        cli_main(["push", str(adapter), f"{REPO}-spp", "--base", f"{REPO}@other"])
    assert json.loads((adapter / "spp_config.json").read_text())["base_model_name_or_path"] == str(tiny_run / "pruned")


def test_base_commit_is_the_loaded_revision_not_main(hub, tmp_path, monkeypatch):  # noqa: F811
    """A base loaded from a branch is pinned to that branch's commit; with two revisions cached, to none."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    models = [make_tiny_model("llama", seed=s) for s in (0, 1)]
    for seed, model in enumerate(models):
        prune_magnitude_nm_(model)
        write_model_folder(model, None, tmp_path / f"b{seed}", "card", model_sparsity_record(model, "pruned-base"))
    main_sha = push_folder(tmp_path / "b0", REPO).oid
    v1_sha = push_folder(tmp_path / "b1", REPO, revision="v1").oid
    assert main_sha != v1_sha
    empty_cache(hub, monkeypatch, "v1-only")
    AutoModelForCausalLM.from_pretrained(REPO, revision="v1")
    assert base_commit(REPO) == v1_sha  # the old code resolved main over the network: main_sha
    assert base_commit(REPO, "v1") == v1_sha
    AutoModelForCausalLM.from_pretrained(REPO)  # now main is cached too: the loaded revision is ambiguous
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert base_commit(REPO) is None
    assert any("records none" in str(w.message) for w in caught)


def test_push_folder_leaves_out_local_paths(hub, tmp_path, monkeypatch):  # noqa: F811
    """A pruned base made from a local model (what `spp-hf prune --model DIR --push-to-hub` pushes)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    dense = tmp_path / "dense-model"
    dense.mkdir()
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    record = model_sparsity_record(model, "pruned-base", base_model=str(dense), calibration=str(dense / "calib.jsonl"))
    card = render_pruned_base_card(str(dense), "magnitude", "2:4", "none", record)
    assert str(dense) in card
    (dense / "calib.jsonl").write_text("{}")
    write_model_folder(model, None, tmp_path / "pruned", card, record)
    with pytest.warns(UserWarning, match="Not publishing paths of this machine"):
        push_folder(tmp_path / "pruned", REPO)
    files = pushed_files(hub, REPO)
    assert not [name for name, data in files.items() if str(tmp_path).encode() in data]
    pushed = json.loads(files["sparsity.json"])
    assert pushed["base_model"] is None and pushed["calibration"] is None
    assert pushed["mask_fingerprint"] == record["mask_fingerprint"]
    assert json.loads((tmp_path / "pruned" / "sparsity.json").read_text())["base_model"] == str(dense)  # folder untouched


def test_push_adapter_folder_skips_trainer_checkpoints(hub, tmp_path, monkeypatch):  # noqa: F811
    """An adapter saved in a Trainer's output_dir: named adapters go up, checkpoint-N folders do not."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    record = model_sparsity_record(model, "pruned-base")
    write_model_folder(model, None, tmp_path / "pruned", "card", record)
    sha = push_folder(tmp_path / "pruned", REPO).oid
    name = "model.layers.0.mlp.down_proj"
    fp = fingerprint_modules([(name, dict(iter_linear_weights(model))[name])])
    config = {"r": 1, "target_modules": ["down_proj"], "base_model_name_or_path": REPO, "mask_fingerprint": fp}
    tensors = {f"{name}.spp_alpha": torch.ones(1, 128)}
    out = tmp_path / "out"
    write_adapters(out, {"": AdapterFiles(config, tensors, None, {"spp_adapter": "default"}),
                         "other": AdapterFiles(config, tensors, None, {"spp_adapter": "other"})})  # fmt: skip
    write_adapter_files_in_place(out / "checkpoint-2", config, tensors, None, {"spp_adapter": "default"})
    push_adapter_folder(out, f"{REPO}-spp")
    files = pushed_files(hub, f"{REPO}-spp")
    assert {"spp_config.json", "other/spp_config.json", "other/spp_adapter.safetensors"} <= set(files)
    assert not [f for f in files if f.startswith("checkpoint-")]
    assert json.loads(files["other/spp_config.json"])["base_model_revision"] == sha


def test_run_artifacts_find_variants_through_the_run_layout(tmp_path):
    """Repo suffixes are `methods:` entries (the seed kept when an entry has several); the method is the one the
    merged model's sparsity.json records, so a named variant (lora_star_lr6e3) is described as its method."""
    run = tmp_path / "run"
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    write_model_folder(model, None, run / "pruned", "card", model_sparsity_record(model, "pruned-base"))
    for name, method in (("lora_star_lr6e3_s0", "lora_star"), ("spp_s0", "spp"), ("spp_s1", "spp")):
        write_model_folder(model, None, run / name / "merged", "card", model_sparsity_record(model, "merged", method=method))
    (run / "eval").mkdir()
    found = run_artifacts(run)
    assert sorted(found.variants) == ["lora_star_lr6e3", "spp_s0", "spp_s1"]
    lora = found.variants["lora_star_lr6e3"]
    assert (lora.entry, lora.method, lora.adapter, lora.merged) == ("lora_star_lr6e3", "lora_star", None, run / "lora_star_lr6e3_s0" / "merged")


def test_publish_describes_each_merged_baseline_by_its_own_method(hub, tmp_path, monkeypatch):  # noqa: F811
    """Masked full fine-tuning re-applies nothing: its merged model's card is not LoRA*'s."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = tmp_path / "run"
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    write_model_folder(model, None, run / "pruned", "card", model_sparsity_record(model, "pruned-base"))
    for method in ("masked_full", "lora_star"):
        write_model_folder(model, None, run / f"{method}_s0" / "merged", "card", model_sparsity_record(model, "merged"))
    publish_run(run, REPO)
    cards = {m: ModelCard(pushed_files(hub, f"{REPO}-{m}-merged")["README.md"].decode()) for m in ("masked_full", "lora_star")}
    masked = cards["masked_full"].text
    assert "masked full fine-tuning" in masked and "every non-zero weight" in masked
    assert "LoRA" not in masked and "re-applied" not in masked
    assert "LoRA*" in cards["lora_star"].text and "mask re-applied" in cards["lora_star"].text
    assert cards["masked_full"].data.base_model == REPO and "masked_full" in cards["masked_full"].data.tags
