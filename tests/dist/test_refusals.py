"""What several processes refuse, and how a lost rank is recognised: one line each, before anything
loads (the review of issue 26's sharding found these paths untested)."""
import pytest
import torch


def test_the_cli_refuses_preference_tuning_in_several_processes_before_starting_them(capsys):
    from qforge.cli import main
    code = main(["train", "--data", "unused.jsonl", "--objective", "dpo", "--nproc", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "objective dpo: preference tuning trains in one process" in err


def test_a_preference_job_in_several_processes_is_a_400_naming_the_field():
    from qforge.serve.api import APIError
    from qforge.jobs.methods import check_processes
    with pytest.raises(APIError) as caught:
        check_processes({"n_processes": 2, "method": "qlora"}, "dpo", limit=4, in_method=True)
    assert caught.value.status == 400 and caught.value.param == "method.dpo.hyperparameters.n_processes"
    check_processes({"n_processes": 1, "method": "qlora"}, "orpo", limit=4, in_method=False)  # one process: fine


def test_a_lost_rank_is_recognised_in_gloo_errors_from_fsdp_collectives():
    from qforge.dist import RankLost, lost_contact
    assert lost_contact(RankLost("rank 1 of 2: lost contact"))
    assert lost_contact(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                                     "[127.0.0.1]:29500"))
    assert not lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 6x8)"))
    assert not lost_contact(ValueError("gloo"))  # only runtime failures of a collective


def test_a_checkpoint_tensor_of_another_shape_is_refused_not_sliced():
    from qforge.dist.consolidate import load_whole_into
    p = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"shape \[8, 3\], the model expects \[4, 3\]"):
        load_whole_into(p, torch.ones(8, 3))
    load_whole_into(p, torch.ones(4, 3))
    assert torch.equal(p, torch.ones(4, 3))
