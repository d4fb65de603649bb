"""apply_r4f / remove_r4f: the right layers, torch's semantics and state_dict layout, sigma_max -> 1."""
import pytest
import torch
from helpers import tiny_model, toy_batch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from r3f_opt import RegularizedOptimizer, apply_r4f, r4f_state_dict, remove_r4f

OUT_PROJ = {
    "bert": "classifier", "roberta": "classifier.out_proj", "xlm-roberta": "classifier.out_proj",
    "distilbert": "classifier", "electra": "classifier.out_proj", "deberta-v2": "classifier",
    "bart": "classification_head.out_proj", "gpt2": "score",
}
HEAD = {
    "bert": ["bert.pooler.dense", "classifier"], "roberta": ["classifier.dense", "classifier.out_proj"],
    "xlm-roberta": ["classifier.dense", "classifier.out_proj"], "distilbert": ["pre_classifier", "classifier"],
    "electra": ["classifier.dense", "classifier.out_proj"], "deberta-v2": ["pooler.dense", "classifier"],
    "bart": ["classification_head.dense", "classification_head.out_proj"], "gpt2": ["score"],
}


def sigma_max(layer: nn.Linear) -> float:
    return torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()


@pytest.mark.parametrize("kind", list(OUT_PROJ))
def test_finds_the_head_of_each_architecture(kind):
    model = tiny_model(kind)
    layers = apply_r4f(model)
    assert layers == [model.get_submodule(OUT_PROJ[kind])]
    model = tiny_model(kind)
    assert apply_r4f(model, scope="head") == [model.get_submodule(p) for p in HEAD[kind]]


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_training_forwards_drive_sigma_max_to_one(kind):
    torch.manual_seed(0)
    model = tiny_model(kind, dropout=0.0)
    layer = model.get_submodule(OUT_PROJ[kind])
    with torch.no_grad():
        layer.weight.mul_(50.0)
    assert sigma_max(layer) > 1.5  # not already normalised
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, method="r4f")
    batch = toy_batch(kind)
    for _ in range(5):
        opt.step(lambda: model(**batch))  # two training forwards, one backward each
    assert sigma_max(layer) == pytest.approx(1.0, abs=1e-3)
    model.eval()
    assert sigma_max(layer) == pytest.approx(1.0, abs=1e-3)


def test_same_semantics_and_state_dict_as_torch():
    torch.manual_seed(0)
    ours = tiny_model("roberta")
    theirs = tiny_model("roberta")
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    apply_r4f(ours)
    torch.manual_seed(1)
    spectral_norm(theirs.classifier.out_proj, n_power_iterations=1, eps=1e-12)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    assert "classifier.out_proj.parametrizations.weight.original" in sd_ours
    assert "classifier.out_proj.parametrizations.weight.0._u" in sd_ours
    for k in sd_ours:
        assert torch.equal(sd_ours[k], sd_theirs[k]), k


def test_keeps_the_parameter_object_so_existing_optimizers_still_update_it():
    model = tiny_model("roberta")
    w = model.classifier.out_proj.weight
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, method="r4f")
    assert model.classifier.out_proj.parametrizations.weight.original is w
    before = w.detach().clone()
    opt.step(lambda: model(**toy_batch("roberta")))
    assert not torch.equal(w.detach(), before)


def test_apply_twice_is_idempotent():
    model = tiny_model("bert")
    apply_r4f(model)
    apply_r4f(model)
    assert len(model.classifier.parametrizations.weight) == 1


def test_reapplying_with_other_settings_is_refused_and_changes_nothing():
    model = tiny_model("bert")
    apply_r4f(model, n_power_iterations=3)
    apply_r4f(model)  # no settings asked for: the layer keeps its own (the optimizer's path after a DDP user's call)
    apply_r4f(model, n_power_iterations=3)
    with pytest.raises(ValueError, match="already spectrally normalised with n_power_iterations=3, eps=1e-12, not "
                                         "the n_power_iterations=1 asked for; remove_r4f"):
        apply_r4f(model, n_power_iterations=1)
    with pytest.raises(ValueError, match="not the eps=0.001"):
        apply_r4f(model, scope="head", eps=1e-3)
    assert not hasattr(model.bert.pooler.dense, "parametrizations")  # the check ran before registering any
    assert model.classifier.parametrizations.weight[0].n_power_iterations == 3
    # a head extended later (scope="head" after "out_proj") gives its new layers the existing settings
    apply_r4f(model, scope="head")
    assert model.bert.pooler.dense.parametrizations.weight[0].n_power_iterations == 3
    for bad, exc in ((dict(eps=float("nan")), ValueError), (dict(eps=float("inf")), ValueError),
                     (dict(eps=0.0), ValueError), (dict(n_power_iterations=0), ValueError),
                     (dict(n_power_iterations=True), TypeError), (dict(eps="1e-3"), TypeError)):
        with pytest.raises(exc, match="must be"):
            apply_r4f(tiny_model("bert"), **bad)


def test_remove_bakes_the_normalised_weight():
    torch.manual_seed(0)
    model = tiny_model("roberta", dropout=0.0)
    apply_r4f(model, scope="head")
    batch = toy_batch("roberta")
    model(**batch)  # a training forward updates u, v
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    model.train()
    assert remove_r4f(model) == 2
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert "classifier.out_proj.weight" in model.state_dict()
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want)
    assert sigma_max(model.classifier.out_proj) == pytest.approx(1.0, abs=1e-2)


def test_explicit_head():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    assert apply_r4f(model, head=model[2]) == [model[2]]
    head = nn.Module()
    head.dense, head.out_proj = nn.Linear(4, 4), nn.Linear(4, 2)
    assert apply_r4f(model, head=head) == [head.out_proj]
    assert apply_r4f(model, head=head, scope="head") == [head.dense, head.out_proj]
    with pytest.raises(ValueError, match="nn.Linear"):
        apply_r4f(model, head=nn.ReLU())
    with pytest.raises(ValueError, match="scope"):
        apply_r4f(model, head=model[2], scope="all")


def test_generic_lookup_and_clear_error():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(4, 2)

    m = Custom()
    assert apply_r4f(m) == [m.classifier]
    with pytest.raises(ValueError, match="scope='head' on Custom .* which other layers belong to the head"):
        apply_r4f(Custom(), scope="head")  # a bare Linear: a pooler elsewhere would be missed silently

    class OutProj(nn.Module):  # an unknown model type with a RoBERTa-style head: all of that module's Linears
        def __init__(self):
            super().__init__()
            self.classifier = nn.Module()
            self.classifier.dense, self.classifier.out_proj = nn.Linear(4, 4), nn.Linear(4, 2)

    m = OutProj()
    assert apply_r4f(m, scope="head") == [m.classifier.dense, m.classifier.out_proj]
    with pytest.raises(ValueError, match="head="):
        apply_r4f(nn.Sequential(nn.Linear(2, 2)))


def test_known_model_type_with_another_head_falls_back_to_the_generic_lookup():
    import transformers as tf

    model = tf.RobertaForTokenClassification(tf.RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, pad_token_id=1, num_labels=3))
    assert apply_r4f(model) == [model.classifier]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_r4f_state_dict_is_what_remove_r4f_leaves_and_changes_nothing(kind):
    import copy

    torch.manual_seed(0)
    model = tiny_model(kind)
    apply_r4f(model, scope="head")
    RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, method="r4f").step(
        lambda: model(**toy_batch(kind)))  # u, v moved by a training forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = r4f_state_dict(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # u, v and W as they were
    plain = copy.deepcopy(model)
    remove_r4f(plain)
    want = plain.state_dict()
    assert got.keys() == want.keys() and not any("parametrizations" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
