"""Small random Hugging Face model folders of every architecture ``export_hf`` supports, built from
config objects (nothing is downloaded), with a word-level ``tokenizer.json`` for the text models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

TEXT_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "albert", "electra", "deberta-v2")
IMAGE_TYPES = ("vit", "deit")
WORDS = [f"w{i}" for i in range(90)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
IMAGE_SIZE = 32


def _config(model_type: str, classes: int, layers: int):  # type: ignore[no-untyped-def]
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                 num_labels=classes)
    text = dict(vocab_size=len(VOCAB), max_position_embeddings=72, pad_token_id=0)
    if model_type == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=layers, n_heads=2, hidden_dim=64, num_labels=classes, **text)
    if model_type == "deberta-v2":
        return tf.DebertaV2Config(**small, **text, relative_attention=True, position_buckets=8,
                                  pos_att_type=["p2c", "c2p"])
    if model_type in ("vit", "deit"):
        cls = tf.ViTConfig if model_type == "vit" else tf.DeiTConfig
        return cls(**small, image_size=IMAGE_SIZE, patch_size=8)
    cls = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig,
           "albert": tf.AlbertConfig, "electra": tf.ElectraConfig}[model_type]
    extra = {"embedding_size": 16} if model_type in ("albert", "electra") else {}
    return cls(**small, **text, **extra)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                              ("[SEP]", 3)])
    tok.save(str(path))


def make_folder(root: Path, model_type: str, *, head: bool = True, classes: int = 3, layers: int = 3,
                labels: list[str] | None = None, seed: int = 0) -> Path:
    """``save_pretrained`` of a random model (with a classification head, or the bare encoder)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = _config(model_type, classes, layers)
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {v: k for k, v in enumerate(labels)}
    image = model_type in IMAGE_TYPES
    if head:
        name = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}.get(model_type)
        cls = getattr(tf, name) if name else tf.AutoModelForSequenceClassification
        model = cls(config) if name else cls.from_config(config)
    else:
        model = tf.AutoModel.from_config(config)
    folder = root / f"{model_type}{'' if head else '-encoder'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval().save_pretrained(str(folder))
    if image:
        (folder / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
             "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}))
    else:
        write_tokenizer(folder / "tokenizer.json")
    return folder


def texts_and_labels(n: int, classes: int = 3, seed: int = 0) -> tuple[list[str], list[str]]:
    """Texts of 3 to 20 words whose class is the most frequent of ``classes`` marker words."""
    gen = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(gen.integers(classes))
        words = list(gen.choice(WORDS[classes:], int(gen.integers(2, 18))))
        words += [WORDS[label]] * int(gen.integers(1, 3))
        gen.shuffle(words)
        texts.append(" ".join(words))
        labels.append(str(label))
    return texts, labels


def images_and_labels(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    labels = gen.integers(classes, size=n)
    images = gen.standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) * 0.5
    for i, c in enumerate(labels):
        images[i, c] += 1.0
    return images, labels
