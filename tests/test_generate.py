"""Generation: the KV cache against full re-runs, sampling settings, host-memory tables, stop conditions,
the lm-eval adapter's sampled path and `stage=generate`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import offline_env, run_py

from project.checkpoint import STATE_PREFIX, with_checksum
from project.config import VARIANTS, ConfigError, ModelConfig
from project.data.tokenizer import train_tokenizer
from project.generate import HostTables, SamplingSettings, TextStream, generate, generate_text, next_tokens
from project.kv_cache import KVCache
from project.model import Transformer

# A larger init_std than training's makes a random model's greedy choices vary from token to token, so token
# identity below compares real sequences, not one token repeated.
TINY = dict(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48, n_routed_experts=4,
            moe_top_k=2, init_std=0.3)  # fmt: skip
PROMPTS = [[5, 17, 3, 88, 41, 9, 60, 2, 33], [71, 4], [12, 12, 30, 7, 95]]
TABLE_VARIANTS = [v for v in VARIANTS if "jtok" in v]


def tiny(variant: str, dtype=torch.float64, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict({**TINY, "variant": variant, **overrides})).to(dtype).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_rerunning_each_sequence(variant):
    # float64: the two paths differ by ~1e-15, far below any gap between a random model's top two logits,
    # so identical tokens are expected, not just likely.
    model = tiny(variant)
    cached = generate(model, PROMPTS, SamplingSettings(max_new_tokens=20))
    rerun = generate(model, PROMPTS, SamplingSettings(max_new_tokens=20, use_cache=False))
    assert cached == rerun
    assert all(len(t) == 20 for t in cached)
    assert len({tok for row in cached for tok in row}) >= 8  # real sequences, not one token repeated


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_step_logits_equal_the_full_forward_last_position(variant):
    """Left-padded batch, prefilled then fed one token at a time, against each sequence run alone.

    float64: the two paths sum in other orders (masked attention over the cache vs an unmasked causal pass, other
    matmul shapes); in float32 that is ~1e-5 on these logits, and a router's top-k could flip on a near-tie, in
    float64 ~1e-14 (measured), so the tolerance below has a wide margin and no choice can flip."""
    model = tiny(variant)
    width = max(len(p) for p in PROMPTS)
    cache = KVCache(model.cfg, len(PROMPTS), width + 6, torch.device("cpu"), torch.float64)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for row, p in enumerate(PROMPTS):
        ids[row, width - len(p) :], valid[row, width - len(p) :] = torch.tensor(p), True
    sequences = [list(p) for p in PROMPTS]
    step_ids, step_valid = ids, valid
    worst = 0.0
    with torch.no_grad():
        for step in range(6):
            logits = model(step_ids, cache=cache, valid_BT=step_valid, last_only=True).logits[:, -1]
            for row, seq in enumerate(sequences):
                full = model(torch.tensor([seq])).logits[0, -1]
                worst = max(worst, float((logits[row] - full).abs().max()))
                torch.testing.assert_close(logits[row], full, atol=1e-9, rtol=1e-9)
            next_B = torch.tensor([(7 * step + 3 * row) % 97 for row in range(len(PROMPTS))])
            for row, seq in enumerate(sequences):
                seq.append(int(next_B[row]))
            step_ids, step_valid = next_B[:, None], None
    assert worst < 1e-9  # measured 1e-14 (native and ATEN_CPU_CAPABILITY=default)


@pytest.mark.parametrize("variant", TABLE_VARIANTS)
def test_tables_in_host_memory_give_the_same_tokens(variant):
    model = tiny(variant)
    want = generate(model, PROMPTS, SamplingSettings(max_new_tokens=12))
    served = tiny(variant)
    host = HostTables(served, "cpu")
    # The model keeps only the backbone: every token table is an empty placeholder.
    for name, p in served.named_parameters():
        if ".table" in name:
            assert p.numel() == 0, name
    assert sum(t.numel() for t in host.tables) == sum(
        p.numel() for n, p in model.named_parameters() if ".table" in n
    )
    assert generate(served, PROMPTS, SamplingSettings(max_new_tokens=12), host_tables=host) == want
    with pytest.raises(RuntimeError, match="host memory"):
        served(torch.tensor([[1, 2, 3]]))


def test_host_tables_need_a_variant_with_tables():
    with pytest.raises(ConfigError, match="no token-indexed tables"):
        HostTables(tiny("moe"))


def test_sampling_is_seeded_and_degenerates_to_greedy():
    model = tiny("jtok_m")
    sampled = SamplingSettings(max_new_tokens=15, temperature=1.0, seed=7)
    first = generate(model, PROMPTS, sampled)
    assert generate(model, PROMPTS, sampled) == first
    assert generate(model, PROMPTS, SamplingSettings(max_new_tokens=15, temperature=1.0, seed=8)) != first
    greedy = generate(model, PROMPTS, SamplingSettings(max_new_tokens=15))
    assert first != greedy
    assert generate(model, PROMPTS, SamplingSettings(max_new_tokens=15, temperature=1.0, top_k=1, seed=7)) == greedy
    # top_p small enough keeps only the most likely token
    assert generate(model, PROMPTS, SamplingSettings(max_new_tokens=15, temperature=1.0, top_p=1e-6, seed=7)) == greedy


def test_top_k_and_top_p_only_draw_from_their_sets():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    gen = torch.Generator().manual_seed(0)
    order = logits.argsort(-1, descending=True)
    probs = logits.softmax(-1).gather(-1, order)
    nucleus = (probs.cumsum(-1) - probs) < 0.8  # in sorted order: ranks whose predecessors sum below top_p
    for _ in range(200):
        k_tok = next_tokens(logits, SamplingSettings(temperature=1.0, top_k=5), gen)
        assert (order[:, :5] == k_tok[:, None]).any(-1).all()
        p_tok = next_tokens(logits, SamplingSettings(temperature=1.0, top_p=0.8), gen)
        rank = (order == p_tok[:, None]).float().argmax(-1)
        assert nucleus.gather(-1, rank[:, None]).all()


def test_eos_ends_only_its_row_and_stop_callback():
    model = tiny("baseline")
    free = generate(model, PROMPTS, SamplingSettings(max_new_tokens=10))
    eos = free[1][3]  # the token row 1 emits at its 4th step
    ended = generate(model, PROMPTS, SamplingSettings(max_new_tokens=10), eos_id=eos)
    assert ended[1] == free[1][: free[1].index(eos) + 1]  # EOS is kept, nothing after it
    for row in (0, 2):
        cut = free[row].index(eos) + 1 if eos in free[row] else 10
        assert ended[row] == free[row][:cut]
    stopped = generate(model, PROMPTS, SamplingSettings(max_new_tokens=10), stop=lambda row, new: len(new) >= row + 2)
    assert [len(t) for t in stopped] == [2, 3, 4]
    assert generate(model, PROMPTS, SamplingSettings(max_new_tokens=0)) == [[], [], []]
    assert generate(model, [], SamplingSettings(max_new_tokens=3)) == []


def test_clear_errors_for_prompts_that_do_not_fit():
    model = tiny("baseline")
    with pytest.raises(ConfigError, match="more than the model's context"):
        generate(model, [[1] * 40], SamplingSettings(max_new_tokens=9))
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate(model, [[1], []], SamplingSettings(max_new_tokens=2))
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(max_new_tokens=-1)):
        with pytest.raises(ConfigError):
            SamplingSettings(**bad)


@pytest.fixture(scope="module")
def tokenizer():
    docs = [f"the {w} sat on the mat number {i}. é ü 答案" for i, w in enumerate(["cat", "dog", "owl", "emu"] * 10)]
    return train_tokenizer(iter(docs), vocab_size=200, min_frequency=1)


def test_text_stream_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("答案 é").ids
    shown: list[str] = []
    stream = TextStream(tokenizer, 1, lambda _row, text: shown.append(text))
    for token in ids:
        stream(torch.tensor([token]), [True])
    assert "".join(shown) == "答案 é" == stream.text[0]
    assert not any("\ufffd" in s for s in shown)
    cut = TextStream(tokenizer, 1, lambda _row, text: shown.append(text))
    shown.clear()
    for token in tokenizer.encode("ж").ids[:1]:  # half of a two-byte character (never merged), then the end
        cut(torch.tensor([token]), [True])
    assert len(tokenizer.encode("ж").ids) == 2 and shown == []
    cut.finish()
    assert "".join(shown) == cut.text[0]


def test_generate_text_cuts_at_stop_strings(tokenizer):
    model = tiny("jtok", vocab_size=tokenizer.get_vocab_size())
    settings = SamplingSettings(max_new_tokens=12)
    (free,) = generate_text(model, tokenizer, ["the cat"], settings, eos_id=None)
    stop = free[3:5]
    (cut,) = generate_text(model, tokenizer, ["the cat"], settings, eos_id=None, stop=[stop])
    assert cut == free.split(stop)[0] and stop not in cut


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    cfg = ModelConfig.from_dict({**TINY, "variant": "jtok_m", "vocab_size": tokenizer.get_vocab_size()})
    torch.manual_seed(0)
    model = Transformer(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    state = {STATE_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save(with_checksum({"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()},
                              "tokenizer_json": tokenizer.to_str()}), path)  # fmt: skip
    return path


def test_adapter_generate_until_honours_sampling_settings(checkpoint):
    from lm_eval.api.instance import Instance

    from eval.adapter import JTokLM

    lm = JTokLM(checkpoint=str(checkpoint), batch_size=2)

    def ask(gen_kwargs):
        reqs = [Instance("generate_until", None, (p, gen_kwargs), i) for i, p in enumerate(["the cat", "a dog sat"])]
        return lm.generate_until(reqs, disable_tqdm=True)

    greedy = ask({"until": [], "max_gen_toks": 10})
    assert ask({"until": [], "max_gen_toks": 10, "do_sample": False, "temperature": 0.7}) == greedy
    sampled = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.5, "seed": 3}
    assert ask(sampled) == ask(sampled) != greedy
    assert ask({**sampled, "top_k": 1}) == greedy
    # Context and new tokens share the 48-token window: max_gen_toks is cut so the context keeps at least half.
    budget = lambda n, ctx: lm._sampling({"max_gen_toks": n, "until": []}, ctx).max_new_tokens  # noqa: E731
    assert (budget(8, 5), budget(256, 5), budget(256, 40), budget(30, 40)) == (8, 43, 24, 24)
    assert len(ask({"until": [], "max_gen_toks": 256})) == 2  # asks for more than the window holds: no error


def test_generate_stage_streams_and_writes_generations(checkpoint, tmp_path, tokenizer):
    env = offline_env(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": "a dog"}\n\n{"prompt": "the owl sat"}\n')
    run = tmp_path / "gen"
    run_py(env, "stage=generate", f"ckpt_path={checkpoint}", f"generate.prompts_file={prompts}",
           "generate.temperature=0", "generate.max_new_tokens=6", "generate.batch_size=2", f"run_dir={run}",
           "generate.host_tables=true")  # fmt: skip
    records = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["the cat", "a dog", "the owl sat"]
    single = run_py(env, "stage=generate", f"ckpt_path={checkpoint}", "prompt=a dog", "generate.temperature=0",
                    "generate.max_new_tokens=6", f"run_dir={tmp_path / 'one'}")  # fmt: skip
    assert records[1]["generation"] in single.stdout  # streamed, same as in the batch (greedy)


def test_generate_stage_needs_one_source_of_prompts(tmp_path):
    from stages import read_prompts

    with pytest.raises(ConfigError, match="exactly one of prompt"):
        read_prompts(None, None)
    with pytest.raises(ConfigError, match="exactly one of prompt"):
        read_prompts("hi", str(tmp_path / "p.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(None, str(tmp_path / "p.txt"))
    (tmp_path / "p.jsonl").write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ConfigError, match='"prompt"'):
        read_prompts(None, str(tmp_path / "p.jsonl"))
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(None, str(tmp_path / "p.txt"))
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(None, str(tmp_path / "p.txt")) == ["one", "two"]


def test_generate_benchmark_writes_its_table(tmp_path):
    from project.bench import generate as bench

    rows = bench.main(["--variants", "baseline,jtok_m", "--repeats", "2", "--batch", "2", "--prompt-len", "6",
                       "--new-tokens", "5", "--vocab", "64", "--model", "d_model=32", "n_layers=1", "--host-tables",
                       "--out", str(tmp_path)])  # fmt: skip
    assert [(r["variant"], r["mode"]) for r in rows] == [("baseline", "cached"), ("jtok_m", "cached"), ("jtok_m", "host_tables")]
    assert rows[0]["decode_vs_baseline"] == 1.0  # the baseline's own ratio is x / x in every repetition
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    # host-memory tables leave the device with the backbone only: the tables' size less than the plain model
    cached, host = rows[1], rows[2]
    assert host["device_mib"] == pytest.approx(cached["device_mib"] - cached["token_table_mib"], abs=0.15)
    assert (tmp_path / "generate.csv").is_file() and "| jtok_m | host_tables |" in (tmp_path / "generate.md").read_text()
