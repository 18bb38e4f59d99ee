"""What a node tells the server about itself (query.info), and where its data comes from."""

import pytest
import torch
from PIL import Image

from app.client_app import local_data, node_info
from app.config import parse_config
from app.data import DataError


class Ctx:
    def __init__(self, node_config):
        self.node_config = node_config


def test_info_carries_partition_role_and_whether_a_folder_exists_never_the_path():
    info = node_info({"partition-id": 3, "num-partitions": 4, "data-path": "/secret/photos"})
    assert info == {"has_data": 1, "partition_id": 3, "role": 1}
    assert all(isinstance(v, int) for v in info.values())
    assert node_info({"role": "discriminator"}) == {"has_data": 0, "role": 0}
    assert node_info({"role": "boss"})["role"] == -1


def test_a_nodes_own_folder_is_read_in_the_runs_geometry(tmp_path):
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(3):
            Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).convert("RGB").save(tmp_path / f"class{c}" / f"{i}.png")
    data, pid = local_data(parse_config({}), Ctx({"data-path": str(tmp_path), "partition-id": 1}))
    assert tuple(data.x.shape) == (6, 1, 16, 16) and pid == 1       # digits run: 16x16 grayscale


def test_a_missing_folder_fails_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        local_data(parse_config({}), Ctx({"data-path": str(missing)}))
