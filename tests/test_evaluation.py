"""Evaluation: WikiText-2 perplexity (Wanda/SparseGPT windows), zero-shot accuracy through lm-eval, `spp-hf eval`."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
from conftest import TINY, prune_magnitude_nm_
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from spp_hf import SPPConfig, get_spp_model
from spp_hf.cli import main as cli_main
from spp_hf.data.corpora import documents
from spp_hf.pipeline.evaluate_model import evaluate_model
from spp_hf.pipeline.evaluation import (
    OFFLINE_TASKS,
    PAPER_TASKS,
    TASKS_DIR,
    WIKITEXT2_FILE,
    corpus_perplexity,
    load_wikitext2_test,
    perplexity,
    perplexity_result,
    resolve_tasks,
    window_spans,
    zero_shot,
)
from spp_hf.pipeline.results import EvalRecord

ZEROSHOT_DIR = TASKS_DIR.parent / "zeroshot"
# prompt of each bundled task: doc_to_text of spp_hf/data/tasks/spp_<name>.yaml, then " " + choice
PROMPTS = {"spp_arc_easy": ("arc_easy.jsonl", "{query}\nAnswer:"), "spp_copa": ("copa.jsonl", "{query}"),
           "spp_boolq": ("boolq.jsonl", "{query}\nAnswer:"), "spp_openbookqa": ("openbook_qa.jsonl", "{query}"),
           "spp_arc_challenge": ("arc_challenge.jsonl", "{query}\nAnswer:")}  # fmt: skip


# --------------------------------------------------------------------------- helpers
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (256 byte tokens + <eos>), built offline."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", model_max_length=1024)


def tiny_byte_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=256, eos_token_id=256)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(**{**TINY, "vocab_size": 260, "max_position_embeddings": 1024}, eos_token_id=256, bos_token_id=256)
    return LlamaForCausalLM(config).eval()


def labels_loss_ppl(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """Reference: transformers' own causal-LM loss (labels=input_ids) per window, averaged, exp."""
    losses = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            losses.append(model(input_ids=x, labels=x).loss.item())
    return math.exp(sum(losses) / len(losses))


def choice_logliks(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Reference scoring: sum of log p(continuation tokens | context) with a plain forward pass."""
    out = []
    ctx_ids = tokenizer(context, add_special_tokens=False).input_ids
    for choice in choices:
        whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        cont = whole[len(ctx_ids) :]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        positions = range(len(whole) - len(cont) - 1, len(whole) - 1)
        out.append(sum(logp[p, t].item() for p, t in zip(positions, cont)))
    return out


def bundled_rows(task: str, n: int) -> list[dict]:
    with (ZEROSHOT_DIR / PROMPTS[task][0]).open() as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def check_against_direct_scoring(model, tokenizer, found: dict, tasks: list[str], limit: int) -> None:
    for task in tasks:
        rows, template = bundled_rows(task, limit), PROMPTS[task][1]
        samples = sorted(found[task]["samples"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(limit))
        correct = 0
        for row, sample in zip(rows, samples):
            ref = choice_logliks(model, tokenizer, template.format(query=row["query"]), row["choices"])
            assert sample["gold"] == row["gold"]
            assert sample["loglikelihoods"] == pytest.approx(ref, rel=1e-4, abs=1e-3)
            correct += int(max(range(len(ref)), key=ref.__getitem__) == row["gold"])
        assert found[task]["acc"] == pytest.approx(correct / limit)
        assert 0.0 <= found[task]["acc"] <= 1.0 and found[task]["n"] == limit


def randomize_spp_(model) -> None:
    """Random α and β for every adapter (by parameter name, whatever container the layer keeps them in)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".spp_alpha" in name or ".spp_beta" in name:
                param.normal_(0, 0.5)


# --------------------------------------------------------------------------- data and task lists
def test_bundled_wikitext2_is_the_documented_file():
    digest = hashlib.sha256(WIKITEXT2_FILE.read_bytes()).hexdigest()
    assert digest == "a26bd387e6f1d19e45ddbd7fe6fd5aef3f97f457863f0973e3327e68ac6daee8"
    rows = load_wikitext2_test(source="bundled")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_bundled_zeroshot_subsets_are_the_first_rows():
    expected = {"arc_easy.jsonl": 200, "arc_challenge.jsonl": 200, "boolq.jsonl": 200, "openbook_qa.jsonl": 200, "copa.jsonl": 100}
    for name, count in expected.items():
        lines = (ZEROSHOT_DIR / name).read_text().splitlines()
        assert len(lines) == count
        for row in map(json.loads, lines):
            assert set(row) == {"query", "choices", "gold"} and 0 <= row["gold"] < len(row["choices"])
    assert sorted(p.stem for p in TASKS_DIR.glob("spp_*.yaml")) == sorted(OFFLINE_TASKS)


def test_resolve_tasks():
    assert resolve_tasks(None) == list(OFFLINE_TASKS)
    assert resolve_tasks("offline, spp_copa") == list(OFFLINE_TASKS)
    assert resolve_tasks(["default"], online=False) == list(OFFLINE_TASKS)
    assert resolve_tasks(["default", "mmlu"], online=True) == list(PAPER_TASKS) + ["mmlu"]
    assert resolve_tasks(["none"]) == []
    with pytest.raises(ValueError, match="bundled subsets"):
        resolve_tasks(["paper"], online=False)


# --------------------------------------------------------------------------- perplexity
def test_window_spans_are_non_overlapping_and_cover_floor():
    spans = window_spans(1000, 128)
    assert len(spans) == 1000 // 128 == 7
    assert spans[0][0] == 0 and all(e - s == 128 for s, e in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)) and spans[-1][1] <= 1000
    assert window_spans(1000, 128, max_windows=3) == spans[:3]
    assert window_spans(100, 128) == []
    with pytest.raises(ValueError):
        window_spans(1000, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_equals_labels_loss_reference(arch):
    model, tok = tiny_byte_model(arch), byte_tokenizer()
    text = "\n\n".join(load_wikitext2_test(source="bundled"))[:3000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    found = perplexity_result(model, tok, text=text, seqlen=64)
    assert found.windows == len(ids) // 64 and found.tokens == found.windows * 63 and found.total_tokens == len(ids)
    assert found.ppl == pytest.approx(labels_loss_ppl(model, ids, 64, found.windows), rel=1e-5)
    # batching does not change the number; the ragged tail beyond the last full window is never scored
    assert perplexity(model, tok, text=text, seqlen=64, batch_size=4) == pytest.approx(found.ppl, rel=1e-5)
    tail = len(ids) - found.windows * 64
    changed = tok.decode(ids[: len(ids) - tail]) + "#" * tail
    assert perplexity(model, tok, text=changed, seqlen=64) == pytest.approx(found.ppl, rel=1e-6)
    few = perplexity(model, tok, text=text, seqlen=64, max_windows=3)
    assert few == pytest.approx(labels_loss_ppl(model, ids, 64, 3), rel=1e-5) and few != pytest.approx(found.ppl)


def test_corpus_perplexity_scores_the_joined_documents_like_wikitext2():
    model, tok = tiny_byte_model(), byte_tokenizer()
    ids = tok("\n\n".join(documents("c4-heldout")), return_tensors="pt").input_ids[0]
    found = corpus_perplexity(model, tok, "c4-heldout", seqlen=64, max_windows=4)
    assert found.source == "c4-heldout" and found.windows == 4
    assert found.ppl == pytest.approx(labels_loss_ppl(model, ids, 64, 4), rel=1e-5)
    assert corpus_perplexity(model, tok, "c4-sample", seqlen=64, max_windows=4).ppl != pytest.approx(found.ppl, rel=1e-3)
    results = evaluate_model(model, tok, ppl_seqlen=64, ppl_windows=4, ppl_source="bundled", heldout=["c4-heldout"], tasks=None, print_table=False)
    assert set(results["perplexity"]) == {"wikitext2", "c4-heldout"}
    assert results["perplexity"]["c4-heldout"]["ppl"] == pytest.approx(found.ppl, rel=1e-6)
    with pytest.raises(ValueError, match="No bundled corpus named 'c4-held'"):
        corpus_perplexity(model, tok, "c4-held", seqlen=64)


def test_perplexity_defaults_to_wikitext2_and_model_context():
    model, tok = tiny_byte_model(), byte_tokenizer()  # max_position_embeddings 1024
    found = perplexity_result(model, tok, max_windows=2, source="bundled")
    ids = tok("\n\n".join(load_wikitext2_test(source="bundled")), return_tensors="pt").input_ids[0]
    assert found.seqlen == 1024 and found.windows == 2 and found.source == "bundled" and found.total_tokens == len(ids)
    assert found.ppl == pytest.approx(labels_loss_ppl(model, ids, 1024, 2), rel=1e-5)
    model.config.max_position_embeddings = 100_000
    assert perplexity_result(model, tok, max_windows=1, source="bundled").seqlen == 2048  # capped
    with pytest.raises(ValueError, match="smaller seqlen"):
        perplexity(model, tok, text="too short", seqlen=64)


def test_perplexity_spp_unmerged_equals_merged():
    tok = byte_tokenizer()
    model = tiny_byte_model()
    prune_magnitude_nm_(model)
    text = "\n\n".join(load_wikitext2_test(source="bundled"))[:2000]
    pruned_ppl = perplexity(model, tok, text=text, seqlen=64)
    spp = get_spp_model(model, SPPConfig(r=4))
    randomize_spp_(spp)
    unmerged = perplexity(spp, tok, text=text, seqlen=64)
    merged = perplexity(spp.merge_and_unload(), tok, text=text, seqlen=64)
    assert unmerged == pytest.approx(merged, rel=1e-4)
    assert abs(unmerged - pruned_ppl) > 1e-3 * pruned_ppl  # the adapter is really applied


# --------------------------------------------------------------------------- zero-shot through lm-eval
def test_zero_shot_tiny_matches_direct_scoring_and_spp_unmerged_equals_merged():
    tok = byte_tokenizer()
    model = tiny_byte_model()
    prune_magnitude_nm_(model)
    spp = get_spp_model(model, SPPConfig(r=4))
    randomize_spp_(spp)
    tasks, limit = ["spp_copa", "spp_arc_easy"], 4
    unmerged = zero_shot(spp, tok, tasks, limit=limit, log_samples=True)
    check_against_direct_scoring(spp, tok, unmerged, tasks, limit)
    merged_model = spp.merge_and_unload()
    merged = zero_shot(merged_model, tok, tasks, limit=limit, log_samples=True)
    for task in tasks:
        assert merged[task]["num_fewshot"] == 0
        for a, b in zip(unmerged[task]["samples"], merged[task]["samples"]):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-4, abs=1e-3)


# --------------------------------------------------------------------------- CLI
def test_cli_eval_checkpoint_and_spp_adapter_write_json(tmp_path, capsys):
    tok = byte_tokenizer()
    model = tiny_byte_model()
    prune_magnitude_nm_(model)
    base_dir = tmp_path / "pruned"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    common = ["--ppl-seqlen", "64", "--ppl-windows", "3", "--ppl-source", "bundled", "--tasks", "spp_copa", "--limit", "3"]

    out = tmp_path / "base.json"
    assert cli_main(["eval", str(base_dir), *common, "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    assert "wikitext2 perplexity" in capsys.readouterr().out
    assert found["kind"] == "checkpoint" and found["sparsity_pattern"] == "2:4"
    assert found["perplexity"]["wikitext2"]["windows"] == 3
    assert found["perplexity"]["wikitext2"]["ppl"] == pytest.approx(
        perplexity(model, tok, seqlen=64, max_windows=3), rel=1e-5
    )
    assert found["zero_shot"]["spp_copa"]["n"] == 3 and 0 <= found["zero_shot"]["spp_copa"]["acc"] <= 1
    assert EvalRecord.from_dict(found).to_dict() == found  # the one record schema the pipeline writes too

    reloaded = LlamaForCausalLM.from_pretrained(base_dir)
    spp = get_spp_model(reloaded, SPPConfig(r=4, base_model_name_or_path=str(base_dir)))
    randomize_spp_(spp)
    adapter_dir = tmp_path / "adapter"
    spp.save_pretrained(adapter_dir)
    expected = perplexity(spp, tok, seqlen=64, max_windows=3)
    out = tmp_path / "adapter.json"
    assert cli_main(["eval", str(adapter_dir), *common[:6], "--tasks", "none", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    assert found["kind"] == "spp-adapter (merged)" and "zero_shot" not in found
    assert found["perplexity"]["wikitext2"]["ppl"] == pytest.approx(expected, rel=1e-4)
    assert found["sparsity_pattern"] == "2:4"  # merging kept the base's zeros


def test_cli_eval_refuses_hub_tasks_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_byte_model(), byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out = tmp_path / "r.json"
    assert cli_main(["eval", str(tmp_path), "--no-ppl", "--tasks", "paper", "--out", str(out)]) == 2
    assert "bundled subsets" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- SmolLM2 (real weights)
@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_reference_and_range(smollm2):
    model, tok = smollm2
    ids = tok("\n\n".join(load_wikitext2_test(source="bundled")), return_tensors="pt").input_ids[0]
    dense = perplexity(model, tok, seqlen=512, max_windows=2)
    assert dense == pytest.approx(labels_loss_ppl(model, ids, 512, 2), rel=1e-4)
    assert 8 < dense < 60  # SmolLM2-135M: about 20-30 on WikiText-2
    pruned = copy.deepcopy(model)
    prune_magnitude_nm_(pruned)
    assert perplexity(pruned.eval(), tok, seqlen=512, max_windows=2) > 10 * dense


@pytest.mark.slow
def test_smollm2_zero_shot_matches_direct_scoring(smollm2):
    model, tok = smollm2
    tasks, limit = ["spp_arc_easy", "spp_copa"], 5
    found = zero_shot(model, tok, tasks, limit=limit, log_samples=True)
    check_against_direct_scoring(model, tok, found, tasks, limit)
