"""The forgetting measure: the held-out LM loss of a tiny random Llama against a brute-force per-text sum of
`-log_softmax` at the label tokens, and the held-out text file reader."""

import json

import pytest
import torch
from conftest import DEVICES, tiny_roberta
from peft import LoraConfig, get_peft_model
from tiny_decoders import tiny_decoder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForMaskedLM, LlamaForCausalLM, PreTrainedTokenizerFast

from fw_trainer.errors import UsageError
from fw_trainer.forgetting import forgetting_record, language_modelling_loss, read_held_out_texts


WORDS = "the a cat dog sat on mat ran far away and then slept under big small red tree".split()
# Lengths 1 to 13 words: batches mix short and long texts, so that padding is exercised; a one-word text has no label.
TEXTS = [
    "the cat sat on the mat",
    "a dog ran",
    "the big red dog ran far away and then slept under a small tree",
    "cat",
    "a small cat sat under the big tree and then ran",
    "the dog slept",
    "red mat",
]


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built in code (no Hub)."""
    specials = ["[PAD]", "[UNK]"] if pad else ["[UNK]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]" if pad else None)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    return tiny_decoder("llama", seed=seed, vocab_size=vocab_size)


def brute_force_loss(model, tokenizer, texts) -> torch.Tensor:
    """Each text alone, unpadded: the sum of `-log p(token t + 1 | tokens ≤ t)` over every text, over the count."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            total -= log_probs[torch.arange(len(targets)), targets].sum()
            count += len(targets)
    return total / count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loss_matches_a_per_text_brute_force(device, batch_size):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    expected = brute_force_loss(model, tokenizer, TEXTS)
    loss = language_modelling_loss(model.to(device), tokenizer, TEXTS, batch_size=batch_size)
    assert isinstance(loss, float)
    torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_loss_is_transformers_causal_lm_loss_over_the_whole_sample():
    """One padded batch of every text, pads labelled -100: the token-level mean, not a mean of per-batch means."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
    loss = language_modelling_loss(model, tokenizer, TEXTS, batch_size=2)
    torch.testing.assert_close(torch.tensor(loss), expected, rtol=1e-5, atol=1e-6)
    # A mean of per-batch means weighs the tokens of a short batch more: here it would differ.
    per_batch = [language_modelling_loss(model, tokenizer, TEXTS[i : i + 2]) for i in (0, 2, 4)]
    assert abs(sum(per_batch) / 3 - loss) > 1e-3


def test_a_tokenizer_without_pad_token_and_left_padding_give_the_same_loss():
    """Padding is the function's own (right, masked out): the tokenizer's pad token and padding side do not matter."""
    tokenizer = tiny_tokenizer(pad=False)
    assert tokenizer.pad_token is None
    model = tiny_llama(len(tokenizer))
    expected = brute_force_loss(model, tokenizer, TEXTS)
    tokenizer.padding_side = "left"
    loss = language_modelling_loss(model, tokenizer, TEXTS, batch_size=4)
    torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert tokenizer.pad_token is None and tokenizer.padding_side == "left"  # the tokenizer is left as it was


def test_max_length_cuts_long_texts():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    cut = [" ".join(text.split()[:4]) for text in TEXTS]
    expected = brute_force_loss(model, tokenizer, cut)
    loss = language_modelling_loss(model, tokenizer, TEXTS, max_length=4)
    torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_peft_model_no_grad_and_each_modules_mode_restored():
    tokenizer = tiny_tokenizer()
    base = tiny_llama(len(tokenizer))
    expected = brute_force_loss(base, tokenizer, TEXTS)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    model.train()
    frozen = model.base_model.model.model.layers[0].mlp
    frozen.eval()  # a module a caller keeps in eval mode inside a model in training mode
    modes = {name: module.training for name, module in model.named_modules()}
    seen = []
    base.register_forward_pre_hook(lambda module, args: seen.append(module.training))

    # LoRA's B starts at zero and eval mode turns dropout off: the loss is the base model's.
    loss = language_modelling_loss(model, tokenizer, TEXTS, batch_size=3)
    torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert seen and not any(seen)  # measured in eval mode
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model", [BertForMaskedLM, "roberta_classifier"])
def test_an_encoder_model_is_refused_naming_its_class(model):
    tokenizer = tiny_tokenizer()
    if model == "roberta_classifier":
        model, name = tiny_roberta(), "RobertaForSequenceClassification"
    else:
        config = BertConfig(
            vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
        model, name = BertForMaskedLM(config), "BertForMaskedLM"
    with pytest.raises(UsageError, match=f"causal language model, but the model is a {name}"):
        language_modelling_loss(model, tokenizer, TEXTS)


def test_texts_without_a_token_to_predict_are_refused():
    tokenizer = tiny_tokenizer()
    with pytest.raises(UsageError, match="no token to predict"):
        language_modelling_loss(tiny_llama(len(tokenizer)), tokenizer, ["cat", "dog"])


def test_forgetting_record():
    assert forgetting_record(2.0, 2.5) == {
        "held_out_loss_before": 2.0,
        "held_out_loss_after": 2.5,
        "forgetting": 0.5,
    }


def test_read_held_out_texts_one_per_line_or_jsonl(tmp_path):
    plain = tmp_path / "held_out.txt"
    plain.write_text("first text\n\n  \nsecond text\n")
    assert read_held_out_texts(str(plain)) == ["first text", "second text"]
    jsonl = tmp_path / "held_out.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])) + "\n\n")
    assert read_held_out_texts(str(jsonl)) == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "\n \n", "holds no text"),
        ("empty.jsonl", "", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "Line 2 of .* is not JSON"),
        ("no_text.jsonl", '{"content": "x"}\n', 'Line 1 of .* has no "text" string'),
    ],
)
def test_read_held_out_texts_refuses_unusable_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        read_held_out_texts(str(path))
