"""R4F on PEFT (LoRA) sequence-classification models: the head PEFT trains is a copy inside a
``ModulesToSaveWrapper``; that copy, the one the forward runs, is the one normalised."""
import pytest
import torch
from helpers import tiny_model, toy_batch
from test_trainer import Rows, args

from r3f_opt import R3FTrainer, RegularizedOptimizer

peft = pytest.importorskip("peft", reason="PEFT comes with the [trl] extra, which the [test] extra installs")


def lora(kind):
    torch.manual_seed(0)
    return peft.get_peft_model(tiny_model(kind), peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                 target_modules=["query", "value"]))


def normalised(model):
    return sorted(n for n, _ in model.named_modules() if n.endswith("parametrizations.weight"))


@pytest.mark.parametrize("kind, head", [("bert", "classifier"), ("roberta", "classifier.out_proj")])
def test_r4f_normalises_the_trained_copy_of_the_head(kind, head):
    """BERT's head is a bare Linear (wrapped whole by PEFT), RoBERTa's a module with an out_proj."""
    model = lora(kind)
    opt = RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, method="r4f")
    copy = "classifier.modules_to_save.default" + head.removeprefix("classifier")
    assert normalised(model) == [f"base_model.model.{copy}.parametrizations.weight"]
    batch = toy_batch(kind)
    original = f"base_model.model.{copy}.parametrizations.weight.original"
    before = model.get_parameter(original).detach().clone()
    opt.step(lambda: model(**batch))
    after = model.get_parameter(original)
    assert not torch.equal(before, after)  # the normalised copy is the one that trains
    frozen = model.get_submodule("base_model.model.classifier.original_module")
    assert not any(p.requires_grad for p in frozen.parameters())


def test_r3f_trainer_r4f_on_a_lora_model(tmp_path):
    model = lora("bert")
    trainer = R3FTrainer(model=model, args=args(tmp_path, r3f_method="r4f"), train_dataset=Rows(8))
    trainer.train()
    assert normalised(model) == ["base_model.model.classifier.modules_to_save.default.parametrizations.weight"]


def test_saving_an_r4f_lora_model_warns_that_the_head_keeps_its_parametrization(tmp_path):
    model = lora("bert")
    trainer = R3FTrainer(model=model, args=args(tmp_path, r3f_method="r4f"), train_dataset=Rows(8))
    trainer.train()
    with pytest.warns(UserWarning, match=r"keeps the head's spectral-norm parametrization.*remove_r4f"):
        trainer.save_model(str(tmp_path / "export"))
    assert (tmp_path / "export" / "adapter_model.safetensors").exists()
