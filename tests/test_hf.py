"""torchtn.hf on a tiny randomly initialized BERT built from a transformers config (no download)."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from torchtn import MPOEmbedding, MPOLinear, hf  # noqa: E402
from torchtn.cli import main  # noqa: E402
from torchtn.hf import healing, text  # noqa: E402

WORDS = ("the cat dog sat on a mat and ran far away from home to see big small red blue green tree house car road "
         "river sun moon star night day bird fish eats drinks sleeps runs walks jumps quickly slowly happy sad").split()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BertModel (random weights, seeded) and a word-level tokenizer for WORDS, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS] + [f"w{i}" for i in range(250)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))  # (transformers 5 ignores vocab_file=)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_classifier(tiny, tmp_path_factory):
    """The tiny BERT with a 3-class sequence-classification head. A random BERT's pooled outputs barely differ between
    texts, so the head reads their three main directions of variation, whitened (logits of spread ~3)."""
    folder = tmp_path_factory.mktemp("tiny-bert-cls")
    config = transformers.BertConfig.from_pretrained(str(tiny), num_labels=3)
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(config).eval()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tiny))
    with torch.no_grad():
        pooled = model.bert(**tokenizer(sentences(256, seed=7), padding=True, return_tensors="pt")).pooler_output
        mean = pooled.mean(0)
        _, sv, v = torch.linalg.svd(pooled - mean, full_matrices=False)
        weight = 3.0 * v[:3] / (sv[:3, None] / 256**0.5)
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ mean)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_parts_of_a_bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertModel(config)
    parts = {name: hf.part_of(name, m) for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert parts["embeddings.word_embeddings"] == "embeddings"
    assert parts["encoder.layer.0.attention.self.query"] == "attention"
    assert parts["encoder.layer.0.attention.output.dense"] == "attention"
    assert parts["encoder.layer.0.intermediate.dense"] == "mlp"
    assert parts["encoder.layer.0.output.dense"] == "mlp"
    assert parts["pooler.dense"] == "head"
    albert = transformers.AlbertModel(transformers.AlbertConfig(vocab_size=100, embedding_size=8, hidden_size=16,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                intermediate_size=32))
    parts = {name: hf.part_of(name, m) for name, m in albert.named_modules() if isinstance(m, torch.nn.Linear)}
    block = "encoder.albert_layer_groups.0.albert_layers.0"  # blocks named albert_layers.N, not layer.N
    assert parts[f"{block}.attention.query"] == parts[f"{block}.attention.dense"] == "attention"
    assert parts[f"{block}.ffn"] == parts[f"{block}.ffn_output"] == "mlp"
    assert parts["encoder.embedding_hidden_mapping_in"] == parts["pooler"] == "head"


def test_compress_save_load_gives_identical_outputs_and_the_dense_export_loads_in_plain_transformers(tiny, tmp_path):
    teacher, tokenizer = hf.load_pretrained(tiny)
    student, report = hf.compress(teacher, ratio=1.5)
    assert report.compression_ratio >= 1.5
    kinds = {type(m) for m in student.modules()}
    assert MPOLinear in kinds and MPOEmbedding in kinds
    assert isinstance(student.pooler.dense, torch.nn.Linear)  # heads stay dense
    with pytest.raises(ValueError, match=r"skip pattern '\*position_embedding' matches no module"):
        hf.compress(teacher, ratio=1.5, skip=["*position_embedding"])  # a typo (…_embeddings) is named, not ignored
    batch = tokenizer(sentences(5), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = student(**batch).last_hidden_state
    hf.save(student, tmp_path / "m", tokenizer)
    again = hf.load(tmp_path / "m")
    assert type(again) is type(teacher)
    assert [type(m) for m in again.modules()] == [type(m) for m in student.modules()]
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, expected)
    with pytest.raises(FileExistsError):
        hf.save(student, tmp_path / "m")
    # merged dense weights, loaded without torchtn: the same function
    hf.export_dense(student, tmp_path / "dense", tokenizer)
    plain = transformers.AutoModel.from_pretrained(str(tmp_path / "dense"), local_files_only=True).eval()
    assert not any(isinstance(m, (MPOLinear, MPOEmbedding)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError, match="holds a model already"):  # (it was overwritten without asking)
        hf.export_dense(teacher, tmp_path / "dense", tokenizer)


def test_calibrated_compression_keeps_more_of_the_model_and_round_trips(tiny, tmp_path):
    teacher, tokenizer = hf.load_pretrained(tiny)
    stats = hf.calibrate(teacher, tokenizer, sentences(64, seed=11))
    assert {"embeddings.word_embeddings", "encoder.layer.0.attention.self.query"} <= set(stats)
    calibrated, report = hf.compress(teacher, ratio=1.5, calibration=stats, allocation="relative")
    plain, _ = hf.compress(teacher, ratio=1.5)
    assert report.compression_ratio >= 1.5
    assert calibrated.embeddings.word_embeddings.vocab_shape[1:] == (1,)  # two-core: rows on the first core
    held = sentences(40, seed=12)
    ours = hf.quality(calibrated, teacher, tokenizer, held)["mean_cosine"]
    theirs = hf.quality(plain, teacher, tokenizer, held)["mean_cosine"]
    assert ours > theirs
    batch = tokenizer(held[:4], padding=True, return_tensors="pt")
    hf.save(calibrated, tmp_path / "m", tokenizer)
    with torch.no_grad():
        assert torch.equal(hf.load(tmp_path / "m")(**batch).last_hidden_state,
                           calibrated(**batch).last_hidden_state)
    with pytest.raises(ValueError, match="at least one text"):
        hf.calibrate(teacher, tokenizer, [])
    # token counts on more text than the model runs on: exactly the tokenizer's ids, every other layer unchanged
    more = sentences(300, seed=13)
    counted = hf.calibrate(teacher, tokenizer, sentences(64, seed=11), token_texts=more)
    ids = [t for row in tokenizer(more)["input_ids"] for t in row]
    expected = torch.bincount(torch.tensor(ids), minlength=teacher.config.vocab_size).double()
    assert torch.equal(counted["embeddings.word_embeddings"].row_counts, expected)
    assert torch.equal(counted["encoder.layer.0.attention.self.query"].input_gram,
                       stats["encoder.layer.0.attention.self.query"].input_gram)


def test_output_sensitive_calibration_keeps_the_sentence_embeddings(tiny, tmp_path):
    """With probes, every layer is truncated in the norm of the error that reaches the normalized sentence
    embedding, and the budget is shared in those absolute units: far closer to the original at the same size."""
    teacher, tokenizer = hf.load_pretrained(tiny)
    texts, held = sentences(64, seed=11), sentences(40, seed=12)
    one_sided = hf.calibrate(teacher, tokenizer, texts)
    sensitive = hf.calibrate(teacher, tokenizer, texts, probes=2, token_texts=sentences(300, seed=13))
    assert all(s.output_gram is not None and s.output_samples > 0 for s in sensitive.values())
    assert all(s.output_gram is None for s in one_sided.values())
    quality = {}
    for label, stats in (("one-sided", one_sided), ("sensitive", sensitive)):
        model, report = hf.compress(teacher, ratio=2.0, calibration=stats)
        assert report.compression_ratio >= 2.0
        quality[label] = hf.quality(model, teacher, tokenizer, held)
    assert quality["sensitive"]["mean_cosine"] > 0.999 > quality["one-sided"]["mean_cosine"]
    assert quality["sensitive"]["nn_agreement"] > quality["one-sided"]["nn_agreement"]
    # the frequent tokens' rows exact beside the MPO: saved and loaded with identical outputs
    hybrid, report = hf.compress(teacher, ratio=3.0, calibration=sensitive, exact_rows=0.5)
    table = hybrid.embeddings.word_embeddings
    assert table.exact_rows > 0 and report.compression_ratio >= 3.0
    hf.save(hybrid, tmp_path / "h", tokenizer)
    batch = tokenizer(held[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(hf.load(tmp_path / "h")(**batch).last_hidden_state, hybrid(**batch).last_hidden_state)


def test_refit_brings_a_calibrated_compression_closer_to_the_original_and_round_trips(tiny, tmp_path):
    """hf.refit after a calibrated compress: the compressed model's sentence embeddings move toward the original's on
    the passages it was refit on (a regression on them: more passages than calibration), and the file keeps it."""
    teacher, tokenizer = hf.load_pretrained(tiny)
    texts = sentences(400, seed=21)
    stats = hf.calibrate(teacher, tokenizer, texts[:64], probes=2, token_texts=texts)
    student, _ = hf.compress(teacher, ratio=4.0, calibration=stats)
    before = hf.quality(student, teacher, tokenizer, texts)
    report = hf.refit(student, teacher, tokenizer, texts, calibration=stats)
    after = hf.quality(student, teacher, tokenizer, texts)
    assert report.rows and all(a <= b for _, _, b, a in report.rows)
    assert after["mean_cosine"] > before["mean_cosine"]
    hf.save(student, tmp_path / "r", tokenizer)
    batch = tokenizer(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(hf.load(tmp_path / "r")(**batch).last_hidden_state, student(**batch).last_hidden_state)
    with pytest.raises(ValueError, match="at least one text"):
        hf.refit(student, teacher, tokenizer, [])


def test_healing_lowers_the_distillation_loss(tiny, tmp_path):
    teacher, tokenizer = hf.load_pretrained(tiny)
    student, _ = hf.compress(teacher, ratio=2.0)
    texts, held_out = sentences(256, seed=1), sentences(64, seed=2)
    target = hf.embed(teacher, tokenizer, held_out)

    def distillation_loss():
        return float(healing._heal_loss(hf.embed(student, tokenizer, held_out), target))

    loss_before, before = distillation_loss(), hf.quality(student, teacher, tokenizer, held_out)
    history = hf.heal(student, teacher, tokenizer, texts, epochs=6, batch_size=32, lr=1e-3, val_texts=held_out,
                      checkpoint=tmp_path / "heal.safetensors", progress=False)
    loss_after, after = distillation_loss(), hf.quality(student, teacher, tokenizer, held_out)
    assert loss_after < 0.9 * loss_before and history[-1].val_loss == pytest.approx(loss_after, rel=1e-2)
    assert after["mean_cosine"] > before["mean_cosine"]
    assert 0.0 <= after["nn_agreement"] <= 1.0 and (tmp_path / "heal.safetensors").exists()
    assert hf.throughput(student, tokenizer, held_out[:32], repeats=1) > 0


def test_healing_on_hidden_states_matches_every_token_too(tiny):
    teacher, tokenizer = hf.load_pretrained(tiny)
    student, _ = hf.compress(teacher, ratio=2.0)
    texts, held_out = sentences(256, seed=1), sentences(64, seed=2)
    x = text._encode(tokenizer, held_out, 64)
    student_tokens, teacher_tokens = hf.PooledEncoder(student, tokens=True), hf.PooledEncoder(teacher, tokens=True)
    with torch.no_grad():
        pooled = hf.PooledEncoder(student)(x)
        both = student_tokens(x)
        assert torch.equal(both[:, 0], pooled) and both.shape[1] == 1 + int(x[:, 1].sum(1).max())
        assert (both[:, 1:][x[:, 1, :both.shape[1] - 1] == 0] == 0).all()  # padding positions are zero

        def token_loss():
            return float(healing._token_loss(student_tokens(x), teacher_tokens(x)))
        before = token_loss()
    hf.heal(student, teacher, tokenizer, texts, epochs=6, batch_size=32, lr=1e-3, val_texts=held_out,
            hidden_states=True, progress=False)
    with torch.no_grad():
        assert token_loss() < 0.9 * before


def test_healing_on_a_task_heads_logits(tiny, tiny_classifier, tmp_path):
    teacher, tokenizer = hf.load_pretrained(tiny_classifier, head=True)
    assert type(teacher).__name__ == "BertForSequenceClassification"
    assert type(hf.load_pretrained(tiny_classifier)[0]).__name__ == "BertModel"  # without head: the bare encoder
    student, _ = hf.compress(teacher, ratio=2.0)
    assert isinstance(student.classifier, torch.nn.Linear)  # the head stays dense
    texts, held_out = sentences(256, seed=1), sentences(64, seed=2)
    t = hf.logits(teacher, tokenizer, held_out)
    assert t.shape == (64, 3) and t.argmax(-1).unique().numel() > 1  # a head that tells texts apart
    before = hf.head_quality(student, teacher, tokenizer, held_out, teacher_logits=t)
    s = hf.logits(student, tokenizer, held_out)  # kl is KL(teacher ‖ student), averaged over texts
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert before["kl"] == pytest.approx(float(kl), rel=1e-4)
    # random batches (bucket=0): with 48 steps of a random tiny head, the top-class agreement at a KL of several
    # nats is noise, and this checks the logits path, not the batching (tested in test_trainer)
    history = hf.heal(student, teacher, tokenizer, texts, epochs=6, batch_size=32, lr=1e-3, val_texts=held_out,
                      target="logits", temperature=2.0, progress=False, bucket=0)
    after = hf.head_quality(student, teacher, tokenizer, held_out, teacher_logits=t)
    assert after["kl"] < 0.8 * before["kl"] and after["agreement"] >= before["agreement"]
    # the student ends with the round of least validation loss (keep_best, the default)
    kept = history[history.best_round - 1]
    assert history.best_round >= 1 and kept.val_loss == min(h.val_loss for h in history)
    assert kept.metrics["agreement"] == pytest.approx(after["agreement"], abs=1e-6)
    # on changed passages the head's teacher runs beside the student: the held-out KL falls too
    changed, _ = hf.compress(teacher, ratio=2.0)
    hf.heal(changed, teacher, tokenizer, texts, epochs=6, batch_size=32, lr=1e-3, val_texts=held_out,
            target="logits", progress=False, bucket=0, augment=True)
    assert hf.head_quality(changed, teacher, tokenizer, held_out, teacher_logits=t)["kl"] < 0.8 * before["kl"]
    with pytest.raises(ValueError, match="needs a sequence-level head"):
        hf.logits(hf.load_pretrained(tiny)[0], tokenizer, held_out[:2])
    with pytest.raises(ValueError, match="target='sentences' is not allowed"):
        hf.heal(student, teacher, tokenizer, texts, target="sentences")
    with pytest.raises(ValueError, match="names no transformers task class"):
        config = json.loads((tiny_classifier / "config.json").read_text())
        folder = tmp_path / "no-arch"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "architectures": []}))
        hf.load_pretrained(folder, head=True)


def test_bad_inputs_are_named(tiny, tmp_path):
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="has no text"):
        hf.read_corpus(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="cannot be read"):
        hf.read_corpus(tmp_path / "missing.txt")
    teacher, _ = hf.load_pretrained(tiny)
    with pytest.raises(ValueError, match="ratio=1000 is unreachable"):
        hf.compress(teacher, ratio=1000)
    with pytest.raises(ValueError, match="parts="):
        hf.compress(teacher, ratio=2, parts=("heads",))
    with pytest.raises(TypeError, match="model must be a transformers model .* got str"):
        hf.compress(str(tiny), ratio=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny))
    # one string iterates as its characters: before, embed gave one embedding per character, calibrate and heal
    # ran on single letters
    for call in (lambda t: hf.embed(teacher, tokenizer, t), lambda t: hf.calibrate(teacher, tokenizer, t),
                 lambda t: hf.heal(teacher, teacher, tokenizer, t, progress=False)):
        with pytest.raises(TypeError, match=r"texts is one string \('the cat'…\): pass a list of texts"):
            call("the cat")
    with pytest.raises(TypeError, match="texts must be a list of strings; it holds a int"):
        hf.embed(teacher, tokenizer, ["the cat", 3])
    with pytest.raises(ValueError, match="minutes=-1 is not allowed"):  # (it said max_seconds=-60.0)
        hf.heal(teacher, teacher, tokenizer, ["the cat"], minutes=-1, progress=False)


def test_command_line_compresses_heals_and_refuses_bad_input(tiny, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(300, seed=3)) + "\n")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the corpus given relative to here
    args = ["compress", "--hf-model", str(tiny), "--corpus", "corpus.txt", "--ratio", "3", "--heal-minutes", "0.05",
            "--keep-dense", "*position_embeddings", "--augment", "--min-lr-fraction", "0.5", "--refit", "200",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ratio"] >= 3 and results["heal_history"]
    assert (out / "healing.png").read_bytes()[:4] == b"\x89PNG"  # the healing curve
    refit_rows = results["refit"]  # every two-core map, refit in call order, none worse than before
    assert refit_rows and refit_rows[0]["layer"].startswith("encoder.layer.0.")
    assert all(r["output_error_after"] <= r["output_error_before"] for r in refit_rows)
    assert results["job"]["augment"] is True and results["job"]["min_lr_fraction"] == 0.5
    assert results["job"]["batch_size"] == 128 and results["throughput_batch_size"] == 32  # the measure
    table = hf.load(out / "model").embeddings.word_embeddings  # the frequent tokens' rows exact (the default 0.8)
    assert isinstance(table, MPOEmbedding) and table.exact_rows > 0 and results["job"]["exact_rows"] == 0.8
    assert results["quality_after_healing"]["mean_cosine"] >= results["quality_before_healing"]["mean_cosine"]
    assert (out / "model" / "torchtn.safetensors").exists() and (out / "model" / "config.json").exists()
    printed = capsys.readouterr()
    assert "nearest-neighbour agreement" in printed.out
    assert "it/s" not in printed.err  # --no-progress: no bars, transformers' own (loading weights) included
    again = hf.load(out / "model")
    assert any(isinstance(m, MPOLinear) for m in again.modules())
    assert isinstance(again.embeddings.position_embeddings, torch.nn.Embedding)  # --keep-dense
    # --resume alone continues the run with the settings it recorded first (hf_job.json), and names a changed one
    recorded = json.loads((out / "hf_job.json").read_text())
    assert recorded["ratio"] == 3 and recorded["corpus"] == str(corpus.resolve())  # absolute: resumable anywhere
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["compress", "--out", str(out), "--resume", "--no-progress"]) == 0
    taken = capsys.readouterr().out
    assert f"hf_model={tiny}" in taken and "augment=True" in taken and "keep_dense=['*position_embeddings']" in taken
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["job"] == results["job"]
    assert resumed["seconds"] >= sum(r["seconds"] for r in results["heal_history"])  # the first run's healing counted
    assert main(["compress", "--out", str(out), "--resume", "--ratio", "2"]) == 2
    assert "ratio: 3.0 → 2.0" in capsys.readouterr().err
    for bad, message in [(["--hf-model", str(tmp_path)], "is not a Hugging Face model folder"),
                         (["--hf-model", str(tiny), "--corpus", str(tmp_path / "none.txt")], "cannot be read"),
                         (["--hf-model", str(tiny)], "needs --corpus")]:
        rest = ["--corpus", str(corpus)] if "--corpus" not in bad and "needs" not in message else []
        code = main(["compress", *bad, *rest, "--ratio", "1.5", "--out", str(tmp_path / "x"), "--no-progress"])
        assert code == 2 and message in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(tiny), "--corpus", str(corpus), "--ratio", "500", "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert main(["compress", "--calibrate", "8", "--ratio", "2", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--calibrate is for --hf-model" in capsys.readouterr().err
    assert main(["compress", "--probes", "2", "--ratio", "2", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--probes is for --hf-model" in capsys.readouterr().err
    assert main(["compress", "--exact-rows", "0.5", "--ratio", "2", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--exact-rows is for --hf-model" in capsys.readouterr().err
    assert main(["compress", "--refit", "50", "--ratio", "2", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--refit is for --hf-model" in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(tiny), "--corpus", str(corpus), "--ratio", "1.5", "--calibrate", "0",
                 "--refit", "50", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--refit needs --calibrate" in capsys.readouterr().err
    for flag in (["--augment"], ["--min-lr-fraction", "0.5"]):
        assert main(["compress", *flag, "--ratio", "2", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
        assert f"{flag[0]} is for --hf-model" in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(tiny), "--corpus", str(corpus), "--ratio", "1.5", "--min-lr-fraction",
                 "1.5", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--min-lr-fraction=1.5 is not allowed: expected a number in [0, 1]" in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(tiny), "--corpus", str(corpus), "--ratio", "1.5", "--calibrate", "0",
                 "--exact-rows", "0.5", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--exact-rows needs --calibrate" in capsys.readouterr().err
    assert main(["compress", "--hf-model", str(tiny), "--corpus", str(corpus), "--ratio", "1.5", "--exact-rows", "2.5",
                 "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--exact-rows=2.5 is not allowed" in capsys.readouterr().err
    plain = tmp_path / "plain"  # --calibrate 0: the plain TT-SVD of the weights (balanced modes, not two cores)
    assert main(["compress", "--hf-model", str(tiny), "--corpus", str(corpus), "--ratio", "1.5", "--heal-minutes", "0",
                 "--calibrate", "0", "--out", str(plain), "--no-progress"]) == 0
    layers = json.loads((plain / "results.json").read_text())["layers"]
    assert all(r["output_error"] is None for r in layers) and any(len(r["in_shape"]) > 2 for r in layers)
    assert all(r["output_error"] is not None for r in results["layers"])


def test_command_line_heals_a_task_head(tiny_classifier, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(300, seed=3)) + "\n")
    out = tmp_path / "run"
    assert main(["compress", "--hf-model", str(tiny_classifier), "--hf-head", "--corpus", str(corpus), "--ratio", "1.5",
                 "--heal-minutes", "0.05", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["quality_after_healing"]) == {"agreement", "kl"}
    assert all(r["output_error"] is not None for r in results["layers"])  # calibrated through the task model too
    assert results["quality_after_healing"]["kl"] <= results["quality_before_healing"]["kl"]
    assert "top-class agreement with the original" in capsys.readouterr().out
    assert type(hf.load(out / "model")).__name__ == "BertForSequenceClassification"
    assert main(["compress", "--hf-head", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--hf-head is for --hf-model" in capsys.readouterr().err
    assert main(["compress", "--keep-dense", "*pooler*", "--out", str(tmp_path / "z"), "--no-progress"]) == 2
    assert "--keep-dense is for --hf-model" in capsys.readouterr().err


def test_fortune_corpus_reader(tmp_path):
    from torchtn.data.text import fortune_passages
    from torchtn.data.text import main as write_corpus

    (tmp_path / "quotes").write_text("A short line that is long enough.\n%\nTwo\nlines here, joined into one.\n%\nno\n")
    (tmp_path / "quotes.dat").write_bytes(b"\x00\x01")
    assert fortune_passages(tmp_path) == ["A short line that is long enough.", "Two lines here, joined into one."]
    assert write_corpus([str(tmp_path), str(tmp_path / "c.txt")]) == 0
    assert hf.read_corpus(tmp_path / "c.txt") == fortune_passages(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortune_passages(tmp_path / "nowhere")


def test_relational_loss_is_the_kl_of_each_rows_neighbour_distribution():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    student = teacher + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    tau = 0.1

    def neighbours(e, i):  # row i's softmax over its cosine to every other row, written out
        sims = torch.stack([F.cosine_similarity(e[i], e[j], dim=0) for j in range(len(e)) if j != i])
        return torch.softmax(sims / tau, 0)

    expected = sum(float((neighbours(teacher, i) * (neighbours(teacher, i) / neighbours(student, i)).log()).sum())
                   for i in range(6)) / 6
    assert float(healing._relational_loss(student, teacher, tau)) == pytest.approx(expected, rel=1e-10)
    # what it sees: the geometry between rows, not the rows themselves
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    scales = torch.rand(6, 1, generator=gen, dtype=torch.float64) + 0.5
    moved = teacher @ rotation * scales
    assert float(healing._relational_loss(moved, teacher, tau)) == pytest.approx(0.0, abs=1e-12)
    assert float(healing._heal_loss(moved, teacher)) > 0.1  # the embedding loss sees the rotation
    assert float(healing._heal_loss(moved, teacher, relational=2.0, temperature=tau)) == float(healing._heal_loss(moved, teacher))
    assert float(healing._heal_loss(student, teacher, relational=2.0, temperature=tau)) == pytest.approx(
        float(healing._heal_loss(student, teacher)) + 2.0 * expected, rel=1e-10)
    assert float(healing._relational_loss(student[:2], teacher[:2], tau)) == 0.0  # a pair has nothing to rank


def test_healing_with_the_relational_term_lowers_it(tiny):
    teacher, tokenizer = hf.load_pretrained(tiny)
    student, _ = hf.compress(teacher, ratio=2.0)
    texts, held_out = sentences(256, seed=1), sentences(64, seed=2)
    target = hf.embed(teacher, tokenizer, held_out)

    def relational():
        return float(healing._relational_loss(hf.embed(student, tokenizer, held_out), target, 0.05))

    before = relational()
    history = hf.heal(student, teacher, tokenizer, texts, epochs=6, batch_size=32, lr=1e-3, val_texts=held_out,
                      relational=1.0, min_lr_fraction=1.0, progress=False)
    assert relational() < 0.8 * before and history.best_round >= 1
    with pytest.raises(ValueError, match="relational=-1"):
        hf.heal(student, teacher, tokenizer, texts, relational=-1)
    with pytest.raises(ValueError, match="relational_temperature=0"):
        hf.heal(student, teacher, tokenizer, texts, relational=1.0, relational_temperature=0)


def test_passage_augment_crops_and_drops_inside_the_special_tokens(tiny):
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tiny))
    x = text._encode(tokenizer, sentences(64, seed=3) + ["cat"], 64)
    aug = hf.PassageAugment.for_tokenizer(tokenizer, min_crop=0.5, drop=0.2)
    y = aug(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(aug(x, torch.Generator().manual_seed(0)), y)  # seeded
    assert not torch.equal(aug(x, torch.Generator().manual_seed(1)), y)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    changed = 0
    for before, after in zip(x, y):
        n, k = int(before[1].sum()), int(after[1].sum())
        assert torch.equal(after[1, :k], torch.ones(k, dtype=after.dtype)) and (after[1, k:] == 0).all()
        assert (after[0, k:] == pad).all()
        body, kept = before[0, 1:n - 1].tolist(), after[0, 1:k - 1].tolist()
        assert after[0, 0] == cls and after[0, k - 1] == sep and 1 <= len(kept) <= len(body)
        it = iter(body)  # the kept tokens are a subsequence of the passage's, in order
        assert all(any(t == u for u in it) for t in kept)
        changed += kept != body
    assert changed > 32  # most passages change
    # no crop and no drop: the batch comes back as it was
    assert torch.equal(hf.PassageAugment.for_tokenizer(tokenizer, min_crop=1.0, drop=0.0)(x, torch.Generator()), x)
    with pytest.raises(ValueError, match="drop=1.0"):
        hf.PassageAugment([cls, sep], drop=1.0)
    with pytest.raises(ValueError, match="min_crop=1.5"):
        hf.PassageAugment([cls, sep], min_crop=1.5)


def test_healing_on_augmented_passages_runs_the_teacher_on_them(tiny, monkeypatch):
    teacher, tokenizer = hf.load_pretrained(tiny)
    student, _ = hf.compress(teacher, ratio=2.0)
    texts, held_out = sentences(256, seed=1), sentences(64, seed=2)
    target = hf.embed(teacher, tokenizer, held_out)
    seen = []
    forward = hf.PooledEncoder.forward

    def recording(self, x):
        if self.model is teacher:
            seen.append(x.clone())
        return forward(self, x)
    monkeypatch.setattr(hf.PooledEncoder, "forward", recording)
    before = float(healing._heal_loss(hf.embed(student, tokenizer, held_out), target))
    seen.clear()
    history = hf.heal(student, teacher, tokenizer, texts, epochs=6, batch_size=32, lr=1e-3, val_texts=held_out,
                      augment=True, bucket=0, progress=False)
    after = float(healing._heal_loss(hf.embed(student, tokenizer, held_out), target))
    assert after < 0.9 * before and history.best_round >= 1
    steps = 6 * 256 // 32
    # up front the teacher embeds only the validation passages (the healing ones' targets come per batch)
    assert sum(len(b) for b in seen) == len(held_out) + 6 * len(texts)
    training = seen[-steps:]  # the teacher's batches while healing
    assert len(training) == steps and all(len(b) == 32 for b in training)
    full = text._encode(tokenizer, texts, 64)[:, 1].sum(1)
    # the teacher saw changed passages: fewer tokens than the corpus's batches hold
    assert sum(int(b[:, 1].sum()) for b in training) < 0.9 * 6 * int(full.sum())


def word_tokenizer(vocab, **special):
    """A fast word-level tokenizer over ``vocab`` (its first entry the unknown token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token=vocab[0], **special)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny GPT2Model (its linear maps are transformers' Conv1D, weights (in, out)) with a word-level tokenizer
    that has no padding token, as GPT-2's has none."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = ["<unk>", "<|endoftext|>", *WORDS] + [f"w{i}" for i in range(200)]
    tokenizer = word_tokenizer(vocab, eos_token="<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    transformers.GPT2Model(config).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_a_gpt2_with_conv1d_maps_compresses_heals_saves_and_exports(tiny_gpt2, tmp_path, capsys):
    """GPT-2's Conv1D maps (y = x W + b, W (in, out)) are compressed like nn.Linear ones — calibrated, healed, saved
    and loaded with identical outputs — and the dense export writes Conv1D weights the right way round (the square
    c_proj maps would load transposed without an error otherwise)."""
    conv1d = transformers.pytorch_utils.Conv1D
    original = transformers.GPT2Model.from_pretrained(str(tiny_gpt2)).eval()
    teacher, tokenizer = hf.load_pretrained(tiny_gpt2)
    assert tokenizer.pad_token == "<|endoftext|>"  # padding needs one; it sits past the attention mask
    assert not any(isinstance(m, conv1d) for m in teacher.modules())
    batch = tokenizer(sentences(6, seed=5), padding=True, return_tensors="pt")
    with torch.no_grad():  # linearize keeps the map
        torch.testing.assert_close(teacher(**batch).last_hidden_state, original(**batch).last_hidden_state)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(300, seed=3)) + "\n")
    out = tmp_path / "run"
    assert main(["compress", "--hf-model", str(tiny_gpt2), "--corpus", str(corpus), "--ratio", "2", "--heal-minutes",
                 "0.05", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ratio"] >= 2 and results["heal_history"]
    names = {r["name"] for r in results["layers"]}
    assert {"h.0.attn.c_attn", "h.0.mlp.c_fc"} <= names  # Conv1D maps, calibrated and converted
    assert all(r["output_error"] is not None for r in results["layers"])
    student = hf.load(out / "model")
    assert type(student) is transformers.GPT2Model and any(isinstance(m, MPOLinear) for m in student.modules())
    with torch.no_grad():
        expected = student(**batch).last_hidden_state
    hf.export_dense(student, tmp_path / "dense", tokenizer)
    plain = transformers.GPT2Model.from_pretrained(str(tmp_path / "dense"), local_files_only=True).eval()
    assert isinstance(plain.h[0].attn.c_proj, conv1d) and isinstance(plain.h[1].mlp.c_fc, conv1d)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


def test_a_language_models_tied_embedding_stays_dense():
    """An input table that the output head shares stays dense (an MPO table would leave the head holding it all)."""
    config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    compressed, report = hf.compress(model, ratio=1.2, parts=("attention", "mlp", "embeddings"))
    assert isinstance(compressed.transformer.wte, torch.nn.Embedding)
    assert compressed.lm_head.weight is compressed.transformer.wte.weight
    assert any(s.startswith("transformer.wte (its weight is lm_head's too (tied)") for s in report.skipped)
    assert report.compression_ratio >= 1.2


def test_an_encoder_decoder_model_is_refused_with_what_to_do(tmp_path, capsys):
    vocab = ["<unk>", "<pad>", "</s>", *WORDS]
    config = transformers.T5Config(vocab_size=len(vocab), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                   decoder_start_token_id=1)
    transformers.T5Model(config).save_pretrained(str(tmp_path / "t5"))
    word_tokenizer(vocab, eos_token="</s>", pad_token="<pad>").save_pretrained(str(tmp_path / "t5"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(40)) + "\n")
    assert main(["compress", "--hf-model", str(tmp_path / "t5"), "--corpus", str(corpus), "--ratio", "1.5",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "is an encoder-decoder model (T5Model)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_gpt2_sequence_head_reads_each_passages_last_token_when_padded(tmp_path):
    """GPT-2's tokenizer has no padding token and its sequence head needs one to find each passage's last token: the
    loader pads with the end-of-text token and tells the config, so a padded batch gives each passage's own logits."""
    vocab = ["<unk>", "<|endoftext|>", *WORDS]
    config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                     num_labels=3, architectures=["GPT2ForSequenceClassification"])
    torch.manual_seed(0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(str(tmp_path))
    word_tokenizer(vocab, eos_token="<|endoftext|>").save_pretrained(str(tmp_path))
    model, tokenizer = hf.load_pretrained(tmp_path, head=True)
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1
    texts = sentences(5, seed=4)
    batched = hf.logits(model, tokenizer, texts)
    alone = torch.cat([hf.logits(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
