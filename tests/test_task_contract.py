"""A task plugin that breaks the Task contract, or whose loss goes NaN, is named in the error (task, type, class), and
an error before the first checkpoint leaves no run dir behind: the corrected command runs under the same name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusionkit
from fusionkit.tasks.regression import RegressionTask
from fusionkit.training.trainer import NonFiniteLossError, Trainer

from .test_train_knobs import table_config


@fusionkit.register_task("contract_rowloss")
class RowLoss(RegressionTask):
    def loss(self, output, target, mask):  # type: ignore[no-untyped-def]
        return F.mse_loss(output, target.reshape(output.shape), reduction="none").squeeze(-1)  # [B], not a mean


@fusionkit.register_task("contract_floatloss")
class FloatLoss(RegressionTask):
    def loss(self, output, target, mask):  # type: ignore[no-untyped-def]
        loss = super().loss(output, target, mask)
        return None if loss is None else float(loss)


@fusionkit.register_task("contract_nanloss")
class NanLoss(RegressionTask):
    def loss(self, output, target, mask):  # type: ignore[no-untyped-def]
        loss = super().loss(output, target, mask)
        return None if loss is None else loss * torch.tensor(float("nan"))


@pytest.mark.parametrize(("type_", "got"), [("contract_rowloss", "a torch.float32 tensor of shape [8]"),
                                             ("contract_floatloss", "float ")])  # fmt: skip
def test_a_loss_that_is_not_a_scalar_tensor_names_the_task_and_leaves_no_run_dir(tmp_path: Path, type_: str,
                                                                                   got: str) -> None:
    cfg = table_config(tmp_path, "r", [{"name": "mood"}, {"name": "stars", "type": type_, "column": "score"}],
                       **{"optim.max_steps": 1})
    with pytest.raises(TypeError) as info:
        Trainer(cfg).fit()
    cls = f"{__name__}.{'RowLoss' if type_ == 'contract_rowloss' else 'FloatLoss'}"
    assert f"task 'stars' (type '{type_}', class {cls}): loss must return a scalar float tensor" in str(info.value)
    assert got in str(info.value)
    assert not (tmp_path / "runs" / "r").exists()  # it failed at the first step: nothing to resume, name free again
    fixed = table_config(tmp_path, "r", [{"name": "mood"}, {"name": "stars", "type": "regression", "column": "score"}],
                         **{"optim.max_steps": 1})  # fmt: skip
    assert Trainer(fixed).fit()["steps"] == 1


def test_a_nan_loss_names_the_task_that_gave_it(tmp_path: Path) -> None:
    cfg = table_config(tmp_path, "n", [{"name": "mood"}, {"name": "stars", "type": "contract_nanloss", "column": "score"}],
                       **{"optim.max_steps": 1})  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan from task 'stars' \(type 'contract_nanloss', class "
                                                 rf"{__name__}.NanLoss\): nan at epoch 1, step 1"):  # fmt: skip
        Trainer(cfg).fit()


@fusionkit.register_task("contract_nohead")
class NoHead(RegressionTask):
    def build_head(self, dim, num_views, dropout):  # type: ignore[no-untyped-def]
        return None


def test_a_head_that_is_not_a_module_names_the_task_when_the_model_is_built(tmp_path: Path) -> None:
    cfg = table_config(tmp_path, "h", [{"name": "mood"}, {"name": "stars", "type": "contract_nohead", "column": "score"}],
                       **{"optim.max_steps": 1})  # fmt: skip
    with pytest.raises(TypeError, match=rf"task 'stars' \(type 'contract_nohead', class {__name__}.NoHead\): "
                                        r"build_head must return an nn.Module, got None"):  # fmt: skip
        Trainer(cfg).fit()
    assert not (tmp_path / "runs" / "h").exists()


def test_a_summary_names_the_fusionkit_version_that_wrote_it(tmp_path: Path) -> None:
    cfg = table_config(tmp_path, "v", [{"name": "mood"}], **{"optim.max_steps": 1})
    assert Trainer(cfg).fit()["fusionkit_version"] == fusionkit.__version__
