"""Export to Hugging Face: every variant reloads through AutoModelForCausalLM with our model's logits, the
tokenizer round-trips, lm-eval's own `hf` backend scores an export as our adapter does, bad inputs fail clearly
and the output folder is written whole or not at all."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from project.checkpoint import STATE_PREFIX, CheckpointError, MissingCheckpointError, with_checksum
from project.config import ModelConfig
from project.data.tokenizer import EOS, train_tokenizer
from project.export_hf import ExportError, export, main
from project.model import Transformer

# Widths are multiples of 8 so that the MoE backbone can map onto transformers' MoE classes (targets.py).
TINY = dict(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, n_routed_experts=4, moe_top_k=2,
            expert_hidden=40)  # fmt: skip
# float32 logits of size ~1: the same math through other kernels differs by round-off (~1e-7). Measured max
# difference: 0.0 for LlamaForCausalLM and the remote-code model (the same ops in the same order), <= 1.2e-7 for the
# Granite / GLM-4 MoE classes (softmax over the top-k logits, a fused gate_up matmul).
LOGITS_TOL = 1e-6
# lm-eval scores are sums of ~10 log-probs from batches padded differently by the two adapters.
LOGLIKELIHOOD_TOL = 1e-4
STRINGS = ["hello world", "Fenwick Dray lives in Quibholm.", "  two spaces\nand a newline", "accents é and 答案"]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"Fenwick Dray lives in Quibholm. Item {i}: the quick brown fox jumps over the lazy dog."
              for i in range(40)]  # fmt: skip
    return train_tokenizer(iter(corpus + STRINGS), vocab_size=300, min_frequency=1)


def make_checkpoint(folder: Path, tokenizer, variant: str, expert_bias: bool = False, **overrides):
    """A tiny random model of `variant` saved the way training saves it; returns (path, model in eval mode)."""
    cfg = ModelConfig.from_dict({**TINY, "variant": variant, "vocab_size": tokenizer.get_vocab_size(), **overrides})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms and scales start as constants (1, s_init): make them trained-like, distinct
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".scale")):
                param.normal_(mean=1.0, std=0.3)
    if expert_bias:  # as the aux-loss-free balancing leaves it: only the choice of experts moves
        for layer in model.layers:
            layer.ffn.expert_bias.normal_(std=0.1)
    path = folder / "last.ckpt"
    state = {STATE_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save(with_checksum({"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()},
                              "tokenizer_json": tokenizer.to_str()}), path)  # fmt: skip
    return path, model


def max_logit_diff(hf_model, model, vocab_size: int) -> float:
    ids = torch.randint(0, vocab_size, (3, TINY["max_seq_len"]))
    with torch.no_grad():
        return float((hf_model(ids).logits - model(ids).logits).abs().max())


CASES = [  # (variant, expert bias set, overrides, the transformers class it becomes)
    ("baseline", False, {"tie_embeddings": False}, "LlamaForCausalLM"),
    ("baseline", False, {"n_kv_heads": None}, "LlamaForCausalLM"),
    ("moe", False, {}, "GraniteMoeSharedForCausalLM"),
    ("moe", False, {"n_shared_experts": 0, "tie_embeddings": False}, "GraniteMoeSharedForCausalLM"),
    ("moe", True, {"router_score": "sigmoid"}, "Glm4MoeForCausalLM"),
    ("moe", True, {}, "JTokForCausalLM"),  # softmax scores with a selection bias: no transformers class does this
    ("moe", False, {"expert_hidden": 42}, "JTokForCausalLM"),  # rows transformers' grouped matmul refuses
    ("jtok", False, {}, "JTokForCausalLM"),
    ("jtok_m", False, {"tie_embeddings": False}, "JTokForCausalLM"),
    ("moe_jtok", False, {}, "JTokForCausalLM"),
    ("moe_jtok_m", True, {"router_score": "sigmoid"}, "JTokForCausalLM"),
]


@pytest.mark.parametrize(("variant", "expert_bias", "overrides", "class_name"), CASES,
                         ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])  # fmt: skip
def test_export_reloads_with_our_logits(tmp_path, tokenizer, variant, expert_bias, overrides, class_name):
    path, model = make_checkpoint(tmp_path, tokenizer, variant, expert_bias, **overrides)
    target = export(path, tmp_path / "hf")
    assert target.class_name == class_name
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=target.remote_code).eval()
    assert type(hf_model).__name__ == class_name
    assert max_logit_diff(hf_model, model, tokenizer.get_vocab_size()) <= LOGITS_TOL
    tied = model.cfg.tie_embeddings
    assert (hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight) == tied
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as weights:
        assert ("lm_head.weight" in weights.keys()) == (not tied)  # a tied head is stored once


def test_remote_code_loads_only_with_trust_and_imports_nothing_of_the_project(tmp_path, tokenizer):
    path, _ = make_checkpoint(tmp_path, tokenizer, "jtok_m")
    export(path, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_jtok.JTokConfig",
                                  "AutoModelForCausalLM": "modeling_jtok.JTokForCausalLM"}  # fmt: skip
    for name in ("modeling_jtok.py", "configuration_jtok.py"):
        tree = ast.parse((tmp_path / "hf" / name).read_text())
        absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        absolute |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert absolute <= {"math", "torch", "transformers"}, (name, absolute)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False)


def test_remote_code_padding_and_greedy_generation_match_our_model(tmp_path, tokenizer):
    path, model = make_checkpoint(tmp_path, tokenizer, "moe_jtok_m")
    export(path, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(1, tokenizer.get_vocab_size(), (1, 6))
    pad = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        want = model(ids).logits
        right = hf_model(torch.cat([ids, pad], 1), attention_mask=torch.cat([torch.ones_like(ids), pad], 1)).logits
        left = hf_model(torch.cat([pad, ids], 1), attention_mask=torch.cat([pad, torch.ones_like(ids)], 1)).logits
        assert (right[:, :6] - want).abs().max() <= LOGITS_TOL
        assert (left[:, 3:] - want).abs().max() <= LOGITS_TOL  # positions count from the first real token
        generated = hf_model.generate(ids, max_new_tokens=4, do_sample=False)
        greedy = ids
        for _ in range(4):
            greedy = torch.cat([greedy, model(greedy).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, greedy)


def test_tokenizer_round_trips_as_a_fast_tokenizer_with_eos(tmp_path, tokenizer):
    path, _ = make_checkpoint(tmp_path, tokenizer, "baseline")
    export(path, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert hf_tok.eos_token == EOS and hf_tok.eos_token_id == tokenizer.token_to_id(EOS)
    for text in STRINGS:
        ids = hf_tok(text)["input_ids"]
        assert ids == tokenizer.encode(text).ids
        assert hf_tok.decode(ids) == text


def test_lm_eval_hf_backend_scores_the_export_like_our_adapter(tmp_path, tokenizer, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from eval.adapter import JTokLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = make_checkpoint(tmp_path, tokenizer, "jtok_m")
    export(path, tmp_path / "hf")
    theirs = HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, device="cpu", batch_size=2,
                  dtype="float32")  # fmt: skip
    ours = JTokLM(checkpoint=str(path), device="cpu", batch_size=3)
    pairs = [("Fenwick Dray lives in", " Quibholm."), ("Item 3:", " the quick"), ("", "hello world"),
             ("the quick brown fox jumps over the lazy dog and the quick brown", " fox jumps")]  # fmt: skip
    requests = [SimpleNamespace(args=pair) for pair in pairs]
    got, want = theirs.loglikelihood(requests), ours.loglikelihood(requests)
    for (got_lp, got_greedy), (want_lp, want_greedy) in zip(got, want, strict=True):
        assert got_lp == pytest.approx(want_lp, abs=LOGLIKELIHOOD_TOL)
        assert got_greedy == want_greedy


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as intended
def test_sharded_checkpoint_folder_is_consolidated_then_exported(tmp_path, tokenizer):
    _, model = make_checkpoint(tmp_path, tokenizer, "baseline")
    folder = tmp_path / "sharded.ckpt"  # the layout Lightning's distributed checkpointing writes
    dcp.save({"state_dict": {STATE_PREFIX + k: v for k, v in model.state_dict().items()}}, checkpoint_id=folder,
             no_dist=True)  # fmt: skip
    torch.save({"hyper_parameters": {"model": model.cfg.to_dict()}, "tokenizer_json": tokenizer.to_str()},
               folder / "meta.pt")  # fmt: skip
    export(folder, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert max_logit_diff(hf_model, model, tokenizer.get_vocab_size()) <= LOGITS_TOL


def test_unreadable_or_missing_checkpoints_fail_clearly_and_write_nothing(tmp_path):
    with pytest.raises(MissingCheckpointError, match="does not exist"):
        export(tmp_path / "nope.ckpt", tmp_path / "hf")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        export(tmp_path / "junk.ckpt", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.ckpt"]


def test_output_folder_is_refused_unless_empty_or_overwrite(tmp_path, tokenizer, capsys):
    path, _ = make_checkpoint(tmp_path, tokenizer, "jtok")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export(path, out)
    with pytest.raises(SystemExit) as exit_info:  # the command line says why, in one line, with status 2
        main([str(path), str(out)])
    assert exit_info.value.code == 2 and "not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="not a folder"):
        export(path, out / "keep.txt")
    main([str(path), str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "last.ckpt"]  # no temporary folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    export(path, empty)  # an empty folder is no one's work: no --overwrite needed
    assert (empty / "model.safetensors").is_file()


def test_a_failed_export_leaves_the_old_folder_and_no_temporary_one(tmp_path, tokenizer, monkeypatch):
    import project.export_hf as export_hf

    path, _ = make_checkpoint(tmp_path, tokenizer, "baseline")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_hf, "hf_tokenizer", fail)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        export(path, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "last.ckpt"]
