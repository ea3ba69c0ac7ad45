import os

from agent.fileio import files_signature


def test_signature_changes_when_a_configmap_swaps_its_data_symlink(tmp_path):
    # The layout kubelet makes: files are symlinks through ..data to a timestamped folder.
    v1, v2 = tmp_path / "..2026_01_01", tmp_path / "..2026_01_02"
    v1.mkdir()
    v2.mkdir()
    (v1 / "p.yaml").write_text("a")
    (v2 / "p.yaml").write_text("b")
    os.symlink(v1.name, tmp_path / "..data")
    os.symlink("..data/p.yaml", tmp_path / "p.yaml")
    before = files_signature(str(tmp_path))
    assert files_signature(str(tmp_path)) == before
    os.symlink(v2.name, tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert files_signature(str(tmp_path)) != before
