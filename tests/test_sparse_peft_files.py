"""Saving and loading `get_sparse_peft_model` adapters: PEFT's files plus spp-hf's record of the base.

Expected values are independent of spp_hf: merged weights from an unpatched PEFT copy (`reference_model`: W + ΔW ⊙ M,
W ⊙ (1 + BA)), zeros from `zero_masks` (weight == 0), the LoRA merge also recomputed from the saved tensors, and the
outputs of the model that was saved.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import pruned, zero_masks
from fixtures_hub import TOKEN, hub  # noqa: F401 - the fixture
from fixtures_trainer import char_tokenizer, single_thread  # noqa: F401 - the fixture
from huggingface_hub import constants
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from test_sparse_peft import config, ids, randomize_, reference_model
from transformers import AutoModelForCausalLM

from spp_hf import SPPMismatchError, SPPModel, get_sparse_peft_model, load_sparse_peft_model
from spp_hf.cli import main as cli_main
from spp_hf.hub.transfer import SPPHubError, push_folder
from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import write_model_folder

FILES = {"adapter_config.json", "adapter_model.safetensors", "spp_sparse_peft.json", "README.md"}
PEFT_TYPES = {"lora": "LORA", "lokr": "LOKR", "hira": "HIRA"}


@pytest.fixture
def base_dir(tmp_path):
    """A 2:4-pruned tiny llama saved as spp-hf saves a pruned base (so it can be pushed and its zeros checked)."""
    folder = tmp_path / "base"
    model = pruned("llama")
    card = "---\nlibrary_name: transformers\n---\n# tiny pruned base\n"
    write_model_folder(model, None, folder, card, model_sparsity_record(model, "pruned-base"))
    return folder


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def trained(base_dir, method: str, seed: int = 1):
    model = get_sparse_peft_model(load(base_dir), config(method))
    randomize_(model, method, seed=seed)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


def assert_base_zeros(model, base) -> None:
    found, expected = zero_masks(model), zero_masks(base)
    assert found.keys() == expected.keys()
    for name, mask in expected.items():
        assert torch.equal(found[name], mask), name


def tuner_free(model) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules())


# --------------------------------------------------------------------------- save -> load -> merge
@pytest.mark.parametrize("method", ["lora", "lokr", "hira"])
def test_save_load_merge_round_trip(base_dir, tmp_path, method):
    model = trained(base_dir, method)
    expected = logits(model)
    reference = reference_model(load(base_dir), method, config(method), model.state_dict())
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    model.save_pretrained(out)
    assert {p.name for p in out.iterdir()} == FILES | {"notes.md"}

    record = json.loads((out / "spp_sparse_peft.json").read_text())
    masked = method != "hira"
    assert (record["peft_type"], record["masked"], record["base_model_name_or_path"]) == (PEFT_TYPES[method], masked, str(base_dir))
    suffixes = tuple(config(method).target_modules)
    targeted = {n: m for n, m in zero_masks(load(base_dir)).items() if n.endswith(suffixes)}
    assert {n: e["zeros"] for n, e in record["mask_fingerprint"]["modules"].items()} == {n: int(m.sum()) for n, m in targeted.items()}
    peft_type = json.loads((out / "adapter_config.json").read_text())["peft_type"]
    if masked:
        assert peft_type.startswith(f"{PEFT_TYPES[method]} masked") and "spp_hf.load_sparse_peft_model" in peft_type
    else:
        assert peft_type == "HIRA"

    base = load(base_dir)
    loaded = load_sparse_peft_model(base, out)
    assert type(loaded) is type(model) and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-6, atol=1e-6)
    merged = loaded.merge_and_unload()
    assert tuner_free(merged)
    assert_base_zeros(merged, load(base_dir))
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merged), logits(reference), rtol=1e-5, atol=1e-5)
    if method == "lora":  # the merge recomputed from the saved tensors alone: W + (α/r)·(B A) ⊙ (W ≠ 0)
        saved = load_file(out / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        w = load(base_dir).model.layers[0].self_attn.q_proj.weight
        delta = 2.0 * saved[f"{key}.lora_B.weight"] @ saved[f"{key}.lora_A.weight"]
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, torch.where(w == 0, w, w + delta))

    model.save_pretrained(out)  # again, over its own files: the user's file stays
    assert (out / "notes.md").read_text() == "mine" and {p.name for p in out.iterdir()} == FILES | {"notes.md"}


def test_plain_peft_refuses_a_masked_adapter_and_loads_hira(base_dir, tmp_path):
    trained(base_dir, "lora").save_pretrained(tmp_path / "lora")
    with pytest.raises(KeyError, match=r"masked to the pruned base's zeros by spp-hf.*spp_hf\.load_sparse_peft_model"):
        PeftModel.from_pretrained(load(base_dir), tmp_path / "lora")
    with pytest.raises(KeyError, match="spp_hf"):
        PeftConfig.from_pretrained(tmp_path / "lora")
    with pytest.raises(KeyError, match="spp_hf"):
        LoraConfig.from_pretrained(tmp_path / "lora")

    hira = trained(base_dir, "hira")
    hira.save_pretrained(tmp_path / "hira")
    plain = PeftModel.from_pretrained(load(base_dir), tmp_path / "hira")  # zeros kept by construction: PEFT may load it
    torch.testing.assert_close(logits(plain), logits(hira), rtol=1e-6, atol=1e-6)


def test_a_base_with_other_zeros_is_refused_and_left_as_it_was(base_dir, tmp_path):
    trained(base_dir, "lora").save_pretrained(tmp_path / "adapter")
    other = pruned("llama", seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    grads = [p.requires_grad for p in other.parameters()]
    differ = r"sparse-PEFT masked LoRA adapter .* modules differ, first model\.layers\.0\.\w+\.\w+_proj: zero mask"
    with pytest.raises(SPPMismatchError, match=differ):
        load_sparse_peft_model(other, tmp_path / "adapter")
    assert tuner_free(other) and [p.requires_grad for p in other.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.warns(UserWarning, match="modules differ"):
        load_sparse_peft_model(other, tmp_path / "adapter", strict=False)


def test_sppmodel_loads_and_merges_a_sparse_peft_folder(base_dir, tmp_path, capsys):
    model = trained(base_dir, "lokr")
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    merged = SPPModel.from_pretrained(tmp_path / "adapter")  # the base named in the record, checked, merged
    assert type(merged).__name__ == "LlamaForCausalLM" and tuner_free(merged)
    assert_base_zeros(merged, load(base_dir))
    torch.testing.assert_close(logits(merged.eval()), expected, rtol=1e-5, atol=1e-5)
    trainable = SPPModel.from_pretrained(tmp_path / "adapter", merge=False, is_trainable=True)
    assert isinstance(trainable, PeftModel) and any(p.requires_grad for p in trainable.parameters())

    out = SPPModel.save_merged(tmp_path / "adapter", tmp_path / "merged")
    saved = json.loads((out / "sparsity.json").read_text())
    assert (saved["kind"], saved["method"], saved["base_model"]) == ("merged", "masked_lokr", str(base_dir))
    torch.testing.assert_close(logits(load(out)), expected, rtol=1e-5, atol=1e-5)
    assert cli_main(["inspect", str(out)]) == 0
    assert "[ok] has the base's zeros" in capsys.readouterr().out


def test_named_adapters_load_adapter_and_a_mixed_save(base_dir, tmp_path):
    model = trained(base_dir, "lora")
    model.add_adapter("task", LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "up_proj"]))
    model.set_adapter("task")
    randomize_(model, "lora", seed=2)
    model.save_pretrained(tmp_path / "two")
    assert FILES <= {p.name for p in (tmp_path / "two" / "task").iterdir()}
    expected = logits(model.eval())

    other = get_sparse_peft_model(load(base_dir), config("lora"))
    other.load_adapter(tmp_path / "two" / "task", "task")
    other.set_adapter("task")
    torch.testing.assert_close(logits(other.eval()), expected, rtol=1e-6, atol=1e-6)
    trained(base_dir, "lokr").save_pretrained(tmp_path / "lokr")
    with pytest.raises(ValueError, match="is a LORA adapter, but .* holds a LOKR adapter"):
        other.load_adapter(tmp_path / "lokr", "default")

    weights = tmp_path / "two" / "adapter_model.safetensors"  # a weights file from another save (here PEFT's own)
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="come from different saves"):
        load_sparse_peft_model(load(base_dir), tmp_path / "two")


# --------------------------------------------------------------------------- the Hub: push --base, load, inspect, merge
def test_push_with_base_then_load_inspect_and_merge_from_the_hub(hub, base_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo, adapter = "user/tiny-2of4", "user/tiny-2of4-masked-lora"
    sha = push_folder(base_dir, repo, token=TOKEN).oid
    model = trained(base_dir, "lora")
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SPPHubError, match="not a Hub repo"):  # trained on a local folder: never published as such
        cli_main(["push", str(tmp_path / "adapter"), adapter])
    assert cli_main(["push", str(tmp_path / "adapter"), adapter, "--base", repo]) == 0
    pushed = hub.state.repo(adapter).resolve("main").files
    record, peft_config = json.loads(pushed["spp_sparse_peft.json"]), json.loads(pushed["adapter_config.json"])
    assert (record["base_model_name_or_path"], record["base_model_revision"]) == (repo, sha)
    assert (peft_config["base_model_name_or_path"], peft_config["revision"]) == (repo, sha)
    assert peft_config["peft_type"].startswith("LORA masked") and f'SPPModel.from_pretrained("{adapter}")' in pushed["README.md"].decode()

    cache = hub.cache_dir.parent / "fresh-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    merged = SPPModel.from_pretrained(adapter)  # downloads the base the record names, at the pinned commit
    assert_base_zeros(merged, load(base_dir))
    torch.testing.assert_close(logits(merged.eval()), expected, rtol=1e-5, atol=1e-5)
    loaded = load_sparse_peft_model(load(repo), adapter)
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="spp_hf"):
        PeftModel.from_pretrained(load(repo), adapter)
    loaded.push_to_hub("user/again", base=repo)  # the model's own push: saved, keyed to the Hub base, checked
    assert json.loads(hub.state.repo("user/again").resolve("main").files["spp_sparse_peft.json"])["base_model_revision"] == sha

    capsys.readouterr()
    assert cli_main(["inspect", adapter, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["base"], info["base_revision"]) == ("sparse-PEFT masked LoRA adapter", repo, sha)
    assert info["fingerprint"] == record["mask_fingerprint"]["hash"] and len(info["layers"]) == 6 and info["ok"]
    assert cli_main(["merge", adapter, "--out", str(tmp_path / "merged")]) == 0
    assert_base_zeros(load(tmp_path / "merged"), load(base_dir))
    torch.testing.assert_close(logits(load(tmp_path / "merged")), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- SPPSFTTrainer: checkpoints and resume
def test_trainer_checkpoints_and_resume(base_dir, tmp_path):
    from datasets import Dataset

    from spp_hf import SPPSFTTrainer
    from spp_hf.training.trainer import SPPSFTConfig

    data = Dataset.from_list([{"text": f"sample {i}: the quick brown fox jumps over the lazy dog"} for i in range(16)])
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])

    def run(out, seed, **extra):
        torch.manual_seed(seed)
        base = load(base_dir)
        base.config.pad_token_id, base.config.eos_token_id = 0, 1
        args = SPPSFTConfig(
            output_dir=str(out), max_steps=6, per_device_train_batch_size=2, max_length=32, learning_rate=1e-2,
            save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
            dataloader_num_workers=0, logging_steps=1,
        )  # fmt: skip
        trainer = SPPSFTTrainer(get_sparse_peft_model(base, LoraConfig(**lora)), args=args, train_dataset=data,
                                processing_class=char_tokenizer())  # fmt: skip
        trainer.train(**extra)
        return trainer

    def adapter_state(trainer):
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}

    full = run(tmp_path / "a", seed=0)
    expected = adapter_state(full)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert FILES | {"optimizer.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"].startswith("LORA masked")

    (tmp_path / "b").mkdir()
    shutil.copytree(checkpoint, tmp_path / "b" / "checkpoint-3")
    resumed = run(tmp_path / "b", seed=1234, resume_from_checkpoint=True)  # another init: all from the checkpoint
    assert resumed.state.global_step == 6
    got = adapter_state(resumed)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    full.save_model()
    final = load_sparse_peft_model(load(base_dir), tmp_path / "a")
    torch.testing.assert_close(logits(final), logits(full.model.eval()), rtol=1e-6, atol=1e-6)


def test_publish_a_run_with_a_sparse_peft_adapter(hub, base_dir, tmp_path, monkeypatch):  # noqa: F811
    """A run folder whose variant holds a sparse-PEFT adapter and its merged model, published and loaded back."""
    from spp_hf.hub.publish import publish_run

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(base_dir, run / "pruned")
    model = get_sparse_peft_model(load(run / "pruned"), config("hira"))
    randomize_(model, "hira")
    expected = logits(model.eval())
    model.save_pretrained(run / "hira_s0" / "adapter")
    SPPModel.save_merged(run / "hira_s0" / "adapter", run / "hira_s0" / "merged")

    published = {p.repo_id: p for p in publish_run(run, "user/tiny")}
    assert set(published) == {"user/tiny", "user/tiny-hira", "user/tiny-hira-merged"}
    files = hub.state.repo("user/tiny-hira").resolve("main").files
    record = json.loads(files["spp_sparse_peft.json"])
    assert (record["base_model_name_or_path"], record["base_model_revision"]) == ("user/tiny", published["user/tiny"].commit)
    assert all(str(tmp_path) not in data.decode("utf-8", "replace") for name, data in files.items() if not name.endswith(".safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "fresh"))
    merged = SPPModel.from_pretrained("user/tiny-hira")
    assert_base_zeros(merged, load(base_dir))
    torch.testing.assert_close(logits(merged.eval()), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load("user/tiny-hira-merged")), expected, rtol=1e-5, atol=1e-5)
    plain = PeftModel.from_pretrained(load("user/tiny"), "user/tiny-hira")  # HiRA: plain PEFT loads it from the Hub too
    torch.testing.assert_close(logits(plain), expected, rtol=1e-5, atol=1e-5)
