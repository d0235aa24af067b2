"""Tests of spp_hf.pruning: exact patterns, independent references for Wanda and SparseGPT, the sequential
calibration on several architectures, bad inputs, the CLI, and (slow) the real SmolLM2-135M."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from fixtures_hub import hub  # noqa: F401 - the local Hub fixture
from spp_hf.pruning import load_calibration, parse_sparsity, prune, save_pruned, select_modules
from spp_hf.pruning.magnitude import prune_magnitude_
from spp_hf.pruning.masks import SparsitySpec, mask_from_scores
from spp_hf.pruning.sparsegpt import Hessian, sparsegpt_prune_
from spp_hf.pruning.wanda import InputNorms, prune_wanda_
from spp_hf.sparsity import fingerprint_modules, sparsity_report
from spp_hf.layer_weights import dense_weight
from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import write_model_folder

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "spp_hf" / "data" / "calib" / "c4_demo.jsonl"
WIKITEXT_ROWS = [REPO / "spp_hf" / "data" / "wikitext2" / "test.jsonl", REPO.parent / "shared" / "data" / "wikitext-2-raw" / "test.jsonl"]
ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


# --------------------------------------------------------------------------- helpers
def char_tokenizer():
    """A real (saveable) character-level tokenizer whose ids fit the tiny models' vocabulary of 128."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(i): i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def random_ids(n: int = 8, seqlen: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although pruning failed"


def check_exact(weight: torch.Tensor, spec: SparsitySpec, base_zeros: bool = False) -> None:
    """Exactly N non-zeros per group of M / exactly int(in * ratio) zeros per row. With `base_zeros` (a dense
    model that already has a few exact zeros, like SmolLM2's dequantized weights) at most N / at least that many."""
    out_f, in_f = weight.shape
    if spec.is_nm:
        kept = (weight != 0).reshape(out_f, in_f // spec.m, spec.m).sum(-1)
        ok = (kept <= spec.n) if base_zeros else (kept == spec.n)
        assert ok.all(), f"groups with {kept.unique().tolist()} non-zeros, expected exactly {spec.n}"
    else:
        zeros = (weight == 0).sum(1)
        ok = (zeros >= int(in_f * spec.ratio)) if base_zeros else (zeros == int(in_f * spec.ratio))
        assert ok.all(), f"rows with {zeros.unique().tolist()} zeros"


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few large-norm ("outlier") features, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / math.sqrt(features) + torch.eye(features)
    scale = torch.ones(features)
    scale[torch.randperm(features, generator=g)[: features // 16]] = 8.0
    return (torch.randn(tokens, features, generator=g) @ mix) * scale


# --------------------------------------------------------------------------- sparsity specs and masks
def test_parse_sparsity():
    assert parse_sparsity(0.5) == SparsitySpec(ratio=0.5)
    assert parse_sparsity("75%") == SparsitySpec(ratio=0.75)
    assert parse_sparsity("2:4") == SparsitySpec(n=2, m=4)
    assert str(parse_sparsity(" 4 : 8 ")) == "4:8"
    assert parse_sparsity("2:8").fraction == 0.75


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0", "4:4", "5:4", "0:4", "half"])
def test_parse_sparsity_rejects(bad):
    with pytest.raises(ValueError, match="(0, 1)|N:M|ratio"):
        parse_sparsity(bad)


def test_mask_from_scores_matches_sorting():
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    mask = mask_from_scores(scores, SparsitySpec(ratio=0.75))
    expected = scores <= scores.sort(dim=1).values[:, 11:12]  # the 12 smallest of each row
    assert torch.equal(mask, expected)
    mask = mask_from_scores(scores, SparsitySpec(n=1, m=4))
    groups = scores.reshape(6, 4, 4)
    expected = groups < groups.max(-1, keepdim=True).values
    assert torch.equal(mask, expected.reshape(6, 16))


# --------------------------------------------------------------------------- exactness on every architecture
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "2:8", 0.5, 0.75])
def test_exact_patterns(arch, method, sparsity):
    model = make_tiny_model(arch)
    embed_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    report = prune(model, method, sparsity, calibration=random_ids(), nsamples=8, seqlen=32, progress=False)
    spec = parse_sparsity(sparsity)
    expected = [name for name, _ in select_modules(make_tiny_model(arch))]
    assert report.modules == expected and len(expected) == (8 if arch == "gpt2" else 14)
    for name in report.modules:
        check_exact(dense_weight(model.get_submodule(name)), spec)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert report.ratio == pytest.approx(spec.fraction)
    assert report.pattern == (str(spec) if spec.is_nm else None)
    assert [layer.name for layer in report.stats.layers] == report.modules


def test_methods_give_different_masks():
    """The three methods must not silently fall back to one another."""
    masks = {}
    for method in METHODS:
        model = make_tiny_model("llama")
        prune(model, method, 0.5, calibration=random_ids(), nsamples=8, seqlen=32, progress=False)
        masks[method] = dense_weight(model.get_submodule("model.layers.1.mlp.down_proj")) == 0
    assert not torch.equal(masks["magnitude"], masks["wanda"])
    assert not torch.equal(masks["wanda"], masks["sparsegpt"])


# --------------------------------------------------------------------------- Wanda against a direct computation
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_wanda_single_layer_matches_formula(sparsity):
    layer = nn.Linear(64, 32, bias=False)
    X = correlated_inputs(300, 64)
    stats = InputNorms(64)
    for chunk in X.split(70):  # accumulation over batches
        stats.add_batch(chunk.reshape(1, -1, 64))
    W = layer.weight.detach().clone()
    prune_wanda_(layer.weight.data, stats, parse_sparsity(sparsity))

    score = W.abs() * X.norm(dim=0)  # the paper's |W_ij| * ||X_j||_2
    expected = W.clone()
    if sparsity == 0.5:
        drop = score.argsort(dim=1)[:, :32]
        expected.scatter_(1, drop, 0.0)
    else:
        for r in range(32):
            for c in range(0, 64, 4):
                drop = score[r, c : c + 4].argsort()[:2]
                expected[r, c + drop] = 0.0
    assert torch.equal(layer.weight.data, expected)
    magnitude = W.clone()
    prune_magnitude_(magnitude, parse_sparsity(sparsity))
    assert not torch.equal(magnitude, expected)  # the input norms matter on these inputs


def reference_sequential_wanda(model: nn.Module, ids: torch.Tensor, blocks, ratio: float) -> None:
    """Independent sequential Wanda: for each block, run the whole (partially pruned) model with hooks."""
    for index, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if n and isinstance(dense_weight_or_none(m), torch.Tensor)}
        sq = {n: 0.0 for n in linears}
        hooks = [
            m.register_forward_pre_hook(lambda mod, args, n=n: sq.__setitem__(n, sq[n] + args[0].reshape(-1, args[0].shape[-1]).double().pow(2).sum(0)))
            for n, m in linears.items()
        ]
        with torch.no_grad():
            for row in ids:
                model(row.unsqueeze(0))
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                w = dense_weight(m)
                score = w.abs() * sq[n].sqrt().float()
                k = int(w.shape[1] * ratio)
                w.scatter_(1, score.argsort(dim=1)[:, :k], 0.0)


def dense_weight_or_none(module: nn.Module):
    from spp_hf.layer_weights import is_linear_like

    return dense_weight(module) if is_linear_like(module) else None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wanda_sequential_matches_full_model_reference(arch):
    """The layer-by-layer replay (captured kwargs, pruned earlier blocks) equals running the full model each time."""
    ids = random_ids(6, 24)
    ours, ref = make_tiny_model(arch), make_tiny_model(arch)
    ours.config.use_cache = ref.config.use_cache = False
    prune(ours, "wanda", 0.5, calibration=ids, nsamples=6, seqlen=24, progress=False)
    blocks = ref.model.layers if arch == "llama" else ref.transformer.h
    reference_sequential_wanda(ref, ids, blocks, 0.5)
    for (name, w_ours), (_, w_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(w_ours == 0, w_ref == 0), f"{name}: masks differ"

    # ...and the sequential inputs matter: pruning block 1 from dense inputs would give another mask
    dense_inputs = make_tiny_model(arch)
    reference_sequential_wanda(dense_inputs, ids, dense_inputs.model.layers[1:] if arch == "llama" else dense_inputs.transformer.h[1:], 0.5)
    last = "model.layers.1.mlp.down_proj.weight" if arch == "llama" else "transformer.h.1.mlp.c_proj.weight"
    assert not torch.equal(dict(ours.named_parameters())[last] == 0, dict(dense_inputs.named_parameters())[last] == 0)


class ToyBlock(nn.Module):
    """A block called with keyword-only hidden states that returns a tuple, and needs a replayed kwarg."""

    def __init__(self, d: int, strict_batch: bool):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.strict_batch = strict_batch

    def forward(self, hidden_states=None, scale=None, **kwargs):
        if self.strict_batch and scale.shape[0] != hidden_states.shape[0]:
            raise ValueError("scale must have the batch size of hidden_states")
        return (hidden_states + self.down(torch.relu(self.up(hidden_states * scale))), None)


class ToyLM(nn.Module):
    def __init__(self, d: int = 16, vocab: int = 128, strict_batch: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d, strict_batch) for _ in range(3))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(hidden_states=h, scale=torch.full_like(h, 0.5))[0]
        return h


@pytest.mark.parametrize("strict_batch", [False, True])
def test_generic_block_with_kwargs_and_tuple_output(strict_batch):
    """A non-transformers stack: kwargs-only hidden states, tuple outputs, and (strict_batch) captured arguments
    that do not broadcast over a batch, so block calls must fall back to one sample at a time."""
    torch.manual_seed(0)
    ours = ToyLM(strict_batch=strict_batch)
    ref = copy.deepcopy(ours)
    ids = random_ids(4, 10)
    report = prune(ours, "wanda", 0.5, calibration=ids, nsamples=4, seqlen=10, batch_size=4, progress=False)
    assert report.modules == [f"blocks.{i}.{n}" for i in range(3) for n in ("up", "down")]
    reference_sequential_wanda(ref, ids, ref.blocks, 0.5)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(a == 0, b == 0), name


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_blocks_accept_batched_calls(arch):
    """The captured batch-1 arguments broadcast over a batch in all four architectures (so batching is used)."""
    from spp_hf.pruning.sequential import batching_works, capture_layer_inputs, find_decoder_layers

    model = make_tiny_model(arch)
    model.config.use_cache = False
    _, layers = find_decoder_layers(model)
    call = capture_layer_inputs(model, layers[0], random_ids(4, 16))
    assert call.hidden.shape == (4, 16, 64)
    assert batching_works(layers[0], call.hidden, call, batch_size=4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batched_block_calls_match_one_sample_at_a_time(method):
    a, b = make_tiny_model("mistral"), make_tiny_model("mistral")
    prune(a, method, "2:4", calibration=random_ids(), nsamples=8, seqlen=32, batch_size=1, progress=False)
    prune(b, method, "2:4", calibration=random_ids(), nsamples=8, seqlen=32, batch_size=3, progress=False)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x == 0, y == 0), name
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- SparseGPT
def test_sparsegpt_obs_step_matches_closed_form():
    """Pruning one weight per row in one block: the chosen weight minimises w_j^2 / [(H_F)^-1]_00 over the trailing
    set F = {j, ...}, and the later weights take the least-squares optimal update (earlier ones stay)."""
    rows, cols = 8, 16
    X = correlated_inputs(200, cols, seed=3)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4))
    hessian = Hessian(cols)
    hessian.add_batch(X)
    pruned = W.clone()
    sparsegpt_prune_(pruned, hessian, SparsitySpec(ratio=1 / cols), blocksize=cols, percdamp=0.01)

    H = (2 * X.double().t() @ X.double()) / X.shape[0]
    H += 0.01 * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    W64 = W.double()
    for r in range(rows):
        saliency = torch.stack([W64[r, j] ** 2 / torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)])
        j = int(saliency.argmin())
        assert (pruned[r] == 0).nonzero().flatten().tolist() == [j]
        expected = W64[r].clone()
        expected[j] = 0
        if j + 1 < cols:  # minimise (w~ - w) H (w~ - w)^T over the columns after j
            F = slice(j + 1, cols)
            expected[F] = W64[r, F] + W64[r, j] * torch.linalg.solve(H[F, F], H[F, j])
        torch.testing.assert_close(pruned[r].double(), expected, rtol=1e-4, atol=1e-4)


def test_sparsegpt_lazy_block_updates_equal_unblocked():
    X = correlated_inputs(256, 32, seed=5)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    hessian = Hessian(32)
    hessian.add_batch(X)
    a, b = W.clone(), W.clone()
    sparsegpt_prune_(a, hessian, SparsitySpec(n=2, m=4), blocksize=32)
    sparsegpt_prune_(b, hessian, SparsitySpec(n=2, m=4), blocksize=8)
    assert torch.equal(a == 0, b == 0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def reconstruction_errors(W: torch.Tensor, X: torch.Tensor, spec: SparsitySpec, base_zeros: bool = False) -> dict[str, float]:
    errors = {}
    for method in METHODS:
        w = W.clone()
        if method == "magnitude":
            prune_magnitude_(w, spec)
        elif method == "wanda":
            stats = InputNorms(W.shape[1])
            stats.add_batch(X)
            prune_wanda_(w, stats, spec)
        else:
            hessian = Hessian(W.shape[1])
            hessian.add_batch(X)
            sparsegpt_prune_(w, hessian, spec)
        check_exact(w, spec, base_zeros)
        errors[method] = torch.linalg.norm(X.double() @ (W - w).double().t()).item()
    return errors


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_sparsegpt_reconstruction_beats_wanda_and_magnitude_synthetic(sparsity):
    X = correlated_inputs(1024, 256, seed=7)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(8)) * 0.05
    errors = reconstruction_errors(W, X, parse_sparsity(sparsity))
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# --------------------------------------------------------------------------- module selection and device
def test_modules_selection():
    model = make_tiny_model("llama")
    before = snapshot(model)
    report = prune(model, "magnitude", "2:4", modules=["mlp.down_proj", "q_proj"], progress=False)
    assert report.modules == [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")]
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") in report.modules:
            check_exact(param, SparsitySpec(n=2, m=4))
        else:
            assert torch.equal(param, before[name]), name


def test_explicit_cpu_device_matches_default():
    a, b = make_tiny_model("qwen2"), make_tiny_model("qwen2")
    prune(a, "sparsegpt", "2:4", calibration=random_ids(), nsamples=8, seqlen=32, progress=False)
    prune(b, "sparsegpt", "2:4", calibration=random_ids(), nsamples=8, seqlen=32, device="cpu", progress=False)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_device_moves_one_layer_at_a_time(method):
    cpu, gpu = make_tiny_model("llama"), make_tiny_model("llama")
    prune(cpu, method, "2:4", calibration=random_ids(), nsamples=8, seqlen=32, progress=False)
    prune(gpu, method, "2:4", calibration=random_ids(), nsamples=8, seqlen=32, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    agree = [((x == 0) == (y == 0)).float().mean().item() for x, y in zip(cpu.parameters(), gpu.parameters())]
    assert min(agree) > 0.97  # float differences may flip near-ties only


# --------------------------------------------------------------------------- bad inputs
def _tokenizer_calib(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in text.split("|")) if text else "")
    return path


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=0.0), r"outside \(0, 1\)"),
        (dict(sparsity=1.0), r"outside \(0, 1\)"),
        (dict(sparsity="4:4"), "0 < N < M"),
        (dict(sparsity="6:4"), "0 < N < M"),
        (dict(sparsity="2:3"), "not divisible by M=3"),
        (dict(method="obs"), "Unknown pruning method"),
        (dict(modules=["nope_proj"]), "match no linear layer"),
        (dict(calibration="EMPTY"), "empty"),
        (dict(calibration="SHORT"), "fewer than seqlen"),
        (dict(calibration=torch.zeros(2, 32, dtype=torch.long)), "8 samples of 32 tokens"),
        (dict(calibration=torch.full((8, 32), 500)), "outside the model's vocabulary"),
    ],
)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bad_input_raises_before_any_change(tmp_path, kwargs, match, method):
    kwargs = dict(kwargs)
    if kwargs.get("calibration") == "EMPTY":
        kwargs["calibration"] = _tokenizer_calib(tmp_path, "")
    elif kwargs.get("calibration") == "SHORT":
        kwargs["calibration"] = _tokenizer_calib(tmp_path, "too short|for 32")
    kwargs.setdefault("method", method)
    kwargs.setdefault("calibration", random_ids())
    model = make_tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune(model, tokenizer=char_tokenizer(), nsamples=8, seqlen=32, progress=False, **kwargs)
    assert_unchanged(model, before)


def test_no_decoder_layers():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="No decoder layers found"):
        prune(model, "magnitude", 0.5)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- calibration data
def test_calibration_windows_from_local_files(tmp_path):
    tok = char_tokenizer()
    docs = ["alpha beta gamma " * 5, "delta epsilon " * 7, "zeta eta theta " * 4]
    jsonl = _tokenizer_calib(tmp_path, "|".join(docs))
    stream = tok("\n\n".join(docs))["input_ids"]
    a = load_calibration(jsonl, tok, nsamples=5, seqlen=20, seed=1)
    assert a.input_ids.shape == (5, 20) and "5 x 20 tokens, seed 1" in a.description
    text = "".join(map(chr, stream))
    for row in a.input_ids.tolist():  # every window is a contiguous piece of the joined documents
        assert "".join(map(chr, row)) in text
    assert torch.equal(a.input_ids, load_calibration(jsonl, tok, 5, 20, seed=1).input_ids)
    assert not torch.equal(a.input_ids, load_calibration(jsonl, tok, 5, 20, seed=2).input_ids)

    txt = tmp_path / "calib.txt"
    txt.write_text("\n\n".join(docs))
    assert torch.equal(load_calibration(txt, tok, 5, 20, seed=1).input_ids, a.input_ids)

    import datasets

    ds = datasets.Dataset.from_dict({"text": docs})
    assert torch.equal(load_calibration(ds, tok, 5, 20, seed=1).input_ids, a.input_ids)
    with pytest.raises(ValueError, match="no 'text' column"):
        load_calibration(datasets.Dataset.from_dict({"body": docs}), tok, 5, 20)
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tmp_path / "missing.jsonl", tok, 1, 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        load_calibration(bad, tok, 1, 2)


def test_bundled_calibration_file():
    assert CALIB.is_file() and (CALIB.parent / "SOURCES.md").is_file()
    rows = CALIB.read_text().splitlines()
    assert len(rows) == 200 and all("text" in json.loads(r) for r in rows)


@pytest.mark.slow
def test_c4_default_offline_gives_clear_error():
    code = (
        "from spp_hf.pruning import load_calibration\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_pruning import char_tokenizer\n"
        "try:\n    load_calibration(None, char_tokenizer(), 2, 8)\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "ERR Could not load calibration data 'allenai/c4'" in out.stdout, out.stdout + out.stderr
    assert "local .jsonl/.txt file" in out.stdout


# --------------------------------------------------------------------------- saving and the CLI
@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    model = make_tiny_model("llama")
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_cli_prune_writes_reloadable_pruned_base(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from spp_hf import SPPConfig, get_spp_model
    from spp_hf.cli import main

    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_checkpoint), "--method", "wanda", "--sparsity", "2:4", "--calib", str(CALIB),
            "--nsamples", "4", "--seqlen", "32", "--seed", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    for name in ("config.json", "model.safetensors", "sparsity.json", "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".pruned.*"))  # no staging folder left behind

    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    record = json.loads((out / "sparsity.json").read_text())
    names = [n for n, _ in select_modules(pruned)]
    assert record["method"] == "wanda" and record["sparsity"] == "2:4" and record["pattern"] == "2:4"
    assert record["modules"] == names and record["nsamples"] == 4 and "c4_demo.jsonl" in record["calibration"]
    for name in names:
        check_exact(dense_weight(pruned.get_submodule(name)), SparsitySpec(n=2, m=4))
    for name, param in original.named_parameters():  # everything outside the pruned layers is untouched
        if name.removesuffix(".weight") not in names:
            assert torch.equal(param, dict(pruned.named_parameters())[name]), name
    report = sparsity_report(pruned)
    assert [layer["zeros"] for layer in record["layers"]] == [layer.zeros for layer in report.layers if layer.name in names]
    assert record["mask_fingerprint"] == fingerprint_modules((n, dense_weight(pruned.get_submodule(n))) for n in names)

    spp = get_spp_model(pruned, SPPConfig(r=4, target_modules="all-linear"))
    assert spp.spp_fingerprint() == record["mask_fingerprint"]  # an adapter trained on this base recognises it

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "wanda" in card and "2:4" in card

    # the same command again, same seed: identical weights (reproducible calibration)
    out2 = tmp_path / "again"
    main(argv[:-1] + [str(out2)])
    assert json.loads((out2 / "sparsity.json").read_text())["mask_fingerprint"] == record["mask_fingerprint"]


def test_cli_push_to_hub_then_load_from_hub(tiny_checkpoint, tmp_path, hub, monkeypatch):  # noqa: F811 - fixture
    """`--push-to-hub` uploads the pruned base to a (local) Hub; it loads back from the repo id with its zeros."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoModelForCausalLM

    from spp_hf.cli import main

    monkeypatch.setenv("HF_TOKEN", hub.token)
    argv = ["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--sparsity", "2:4",
            "--out", str(tmp_path / "pruned"), "--push-to-hub", "user/tiny-2of4"]  # fmt: skip
    assert main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained("user/tiny-2of4")
    for name, _ in select_modules(model):
        check_exact(dense_weight(model.get_submodule(name)), SparsitySpec(n=2, m=4))
    record = json.loads(Path(hf_hub_download("user/tiny-2of4", "sparsity.json")).read_text())
    local = json.loads((tmp_path / "pruned" / "sparsity.json").read_text())
    assert record["mask_fingerprint"] == local["mask_fingerprint"]
    assert "user/tiny-2of4" in Path(hf_hub_download("user/tiny-2of4", "README.md")).read_text()


def test_cli_bad_sparsity_exits_with_message(tiny_checkpoint, tmp_path):
    from spp_hf.cli import main

    with pytest.raises(SystemExit, match="0 < N < M"):
        main(["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--sparsity", "4:2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_cli_prune_refuses_a_users_folder_before_loading_anything(tiny_checkpoint, tmp_path, monkeypatch):
    """Review item 3: `--out ~/models` replaced the whole folder, deleting everything in it."""
    from transformers import AutoModelForCausalLM

    from spp_hf.cli import main

    models = tmp_path / "models"
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "weights.bin").write_bytes(b"w")
    (models / "todo.txt").write_text("t")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(SystemExit, match=r"not empty.*never deletes files it did not write"):
        main(["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--sparsity", "2:4", "--out", str(models)])
    assert (models / "llama" / "weights.bin").read_bytes() == b"w" and (models / "todo.txt").read_text() == "t"


def test_save_pruned_refuses_a_users_folder_and_a_merged_model(tmp_path):
    model = make_tiny_model("llama")
    report = prune(model, "magnitude", 0.5, progress=False)
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("a,b")
    with pytest.raises(FileExistsError, match="not a model folder spp-hf wrote"):
        save_pruned(model, None, user, report)
    assert sorted(p.name for p in user.iterdir()) == ["data.csv"]
    merged = write_model_folder(model, None, tmp_path / "merged", "card", model_sparsity_record(model, "merged"))
    with pytest.raises(FileExistsError, match="an spp-hf merged folder"):
        save_pruned(model, None, merged, report)


def test_cli_prune_into_a_fresh_clone_and_through_a_symlink(tiny_checkpoint, tmp_path):
    """Review item 10: a symlinked output folder was refused, after the pruning. A clone's `.git` stays."""
    from spp_hf.cli import main

    real = tmp_path / "scratch" / "pruned"
    (real / ".git").mkdir(parents=True)
    (real / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    os.symlink(real, tmp_path / "out")
    argv = ["prune", "--model", str(tiny_checkpoint), "--method", "magnitude", "--sparsity", "2:4", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert (tmp_path / "out").is_symlink() and (real / "sparsity.json").is_file() and (real / ".git").is_dir()
    assert (real / ".gitattributes").is_file()


def test_save_pruned_overwrites_in_place(tmp_path):
    model = make_tiny_model("gpt2")
    report = prune(model, "magnitude", 0.5, progress=False)
    out = save_pruned(model, None, tmp_path / "m", report, perplexity=12.5)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "eval-notes.md").write_text("mine")
    (out / ".git").mkdir()
    save_pruned(model, None, out, report, perplexity=11.0, perplexity_dataset="wikitext")
    assert not (out / "model-00001-of-00002.safetensors").exists()  # an earlier save's file
    assert (out / "eval-notes.md").read_text() == "mine" and (out / ".git").is_dir()  # the user's entries stay
    record = json.loads((out / "sparsity.json").read_text())
    assert record["perplexity"] == 11.0 and record["pattern"] is None and record["ratio"] == 0.5
    assert record["perplexity_dataset"] == "wikitext" and record["calibration"] is None and record["kind"] == "pruned-base"
    assert "magnitude" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- real model (SmolLM2-135M)
def wikitext2_test_text() -> str:
    """WikiText-2 raw test rows (bundled copy, else the shared one) joined as SparseGPT does."""
    path = next(p for p in WIKITEXT_ROWS if p.is_file())
    return "\n\n".join(json.loads(line)["text"] for line in path.read_text().splitlines())


def perplexity(model: nn.Module, ids: list[int], seqlen: int = 512, windows: int = 4) -> float:
    """exp(mean next-token NLL) over the first `windows` non-overlapping windows (as Wanda/SparseGPT evaluate)."""
    nll = 0.0
    with torch.no_grad():
        for i in range(windows):
            x = torch.tensor([ids[i * seqlen : (i + 1) * seqlen]])
            nll += model(x, labels=x).loss.item()
    return math.exp(nll / windows)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    return load, tok


@pytest.mark.slow
def test_smollm2_reconstruction_sparsegpt_beats_wanda_and_magnitude(smollm2):
    """On real layer inputs (block 5 of SmolLM2, C4 calibration) SparseGPT reconstructs W X best."""
    load, tok = smollm2
    model = load()
    calib = load_calibration(CALIB, tok, nsamples=8, seqlen=256, seed=0)
    block = model.model.layers[5]
    names = {"self_attn.q_proj": [], "self_attn.o_proj": [], "mlp.down_proj": []}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: names[n].append(a[0][0])) for n in names]
    with torch.no_grad():
        for row in calib.input_ids:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    for name, xs in names.items():
        X, W = torch.cat(xs), block.get_submodule(name).weight.detach()
        for sparsity in (0.5, "2:4"):
            errors = reconstruction_errors(W, X, parse_sparsity(sparsity), base_zeros=True)
            print(name, sparsity, {k: round(v, 2) for k, v in errors.items()})
            assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], (name, sparsity, errors)


@pytest.mark.slow
def test_smollm2_perplexity_ordering(smollm2):
    """WikiText-2: dense < {Wanda, SparseGPT} 50% < magnitude 50%, and 2:4 is worse than 50% for each method."""
    load, tok = smollm2
    ids = tok(wikitext2_test_text(), verbose=False)["input_ids"]
    ppl = {"dense": perplexity(load(), ids)}
    for method in METHODS:
        for sparsity in (0.5, "2:4"):
            model = load()
            prune(model, method, sparsity, calibration=CALIB, tokenizer=tok, nsamples=8, seqlen=256, progress=False)
            ppl[method, str(sparsity)] = perplexity(model, ids)
    print(ppl)
    for method in METHODS:
        assert ppl["dense"] < ppl[method, "0.5"] < ppl[method, "2:4"], ppl
    assert ppl["wanda", "0.5"] < ppl["magnitude", "0.5"], ppl
    assert ppl["sparsegpt", "0.5"] < ppl["magnitude", "0.5"], ppl
