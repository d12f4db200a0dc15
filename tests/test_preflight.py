"""Pretrained weights that can't load are refused on the driver, in one line, before any worker starts."""

from __future__ import annotations

import pytest
import torch

import mvit
from pipeline.config import load_config, typed
from pipeline.errors import ModelError
from pipeline.training.preflight import check_model

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    state = mvit.create_model("mvit_tiny", num_classes=8).state_dict()
    torch.save(state, folder / "tiny.pt")
    misshapen = dict(state, **{"patch_embed.weight": torch.zeros(3, 3, 3, 3, 3)})
    torch.save(misshapen, folder / "misshapen.pt")
    other_family = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(8))
    other_family(torch.zeros(1, 3, 4, 8, 8))  # materialise the lazy layer
    torch.save(other_family.state_dict(), folder / "convnet.pt")
    (folder / "text.pt").write_text("not weights\n")
    return folder


@pytest.mark.parametrize(
    ("file", "source", "named"),
    [
        ("misshapen.pt", "native", "patch_embed.weight"),  # the wrong shape
        ("convnet.pt", "native", "cannot load native weights into MViT"),  # another family of model
        ("text.pt", "native", "text.pt"),  # not a torch file at all
    ],
)
def test_pretrained_weights_that_do_not_fit_are_refused_in_one_line(weights, file, source, named):
    cfg = typed(load_config(overrides=[f"model.pretrained={weights / file}", f"model.pretrained_source={source}"]))
    with pytest.raises(ModelError) as raised:
        check_model(cfg, num_classes=8)
    message = str(raised.value)
    assert message.startswith(f"model.pretrained {weights / file} ({source}): ") and "\n" not in message, message
    assert named in message, message
    print(f"FAULT pretrained-{file}-{source}: injected=1 refused_on_the_driver=1 tracebacks=0")


def test_fitting_weights_pass_and_another_head_is_a_warning(weights):
    check_model(typed(load_config(overrides=[f"model.pretrained={weights / 'tiny.pt'}"])), num_classes=8)
    with pytest.warns(UserWarning):
        check_model(typed(load_config(overrides=[f"model.pretrained={weights / 'tiny.pt'}"])), num_classes=3)
