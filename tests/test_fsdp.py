"""FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 CPU processes (gloo) run ``tests/fsdp_script.py``.

Facts measured here (torch 2.13, CPU, gloo), which ``gradwatch/_sharded.py`` relies on:
parameters of a ``fully_shard`` model are ``DTensor`` shards (dim 0, uneven when the
rows do not divide); inside an FSDP unit's forward pre-hooks that run after FSDP's they
are plain full parameters whose tensor hooks see this rank's local gradient; ``.grad``
after backward is a sharded ``DTensor`` whose ``full_tensor()`` is exactly the mean over
ranks of the local gradients.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(tmp_path: pathlib.Path, scenario: str, timeout: float = 120, **extra_env: str) -> dict[int, dict]:
    """Run ``tests/fsdp_script.py SCENARIO`` as ranks 0 and 1; their JSON results by rank."""
    out = tmp_path / scenario
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **extra_env}
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "fsdp_script.py"), str(out), scenario],
                         env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-4000:] for log in logs)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def test_zoo_bugs_are_caught_on_every_rank_and_localised_correct_models_quiet(tmp_path) -> None:
    results = run_two(tmp_path, "zoo")
    for rank, res in results.items():
        for name, correct in res["correct"].items():
            assert correct["verdicts"] == ["pass", "pass"] and all(correct["reliable"]), \
                (rank, name, correct["reports"])
        for name, bug in res["bugs"].items():
            # every check step, the wrong tensors and only they: in the whole-model check, and in the
            # module-local check of the suspect module (the one running the custom Function), as
            # '<module>::<tensor>'
            whole = [[n for n in failing if "::" not in n] for failing in bug["failing"]]
            local = [[n.replace("::", ".") for n in failing if "::" in n] for failing in bug["failing"]]
            assert whole == [bug["wrong"], bug["wrong"]], (rank, name, bug["reports"])
            assert all(set(names) <= set(bug["wrong"]) for names in local), (rank, name, bug["reports"])
            for worst in bug["worst"]:
                # localised: a failing coordinate probe names an element of each wrong tensor, in the
                # module-local check where one covers it (the whole-model failure points there)
                located = {n: w for n, w in worst.items() if "::" in n or "::".join(n.rsplit(".", 1)) not in worst}
                assert all(kind == "coordinate" and failed and index for kind, index, failed in located.values()), \
                    (rank, name, worst)
    # both ranks judged the same probes on the cross-rank means: the same numbers and seeds
    assert results[0]["bugs"] == {k: {**v, "reports": results[0]["bugs"][k]["reports"]}
                                  for k, v in results[1]["bugs"].items()}
    for name in results[0]["correct"]:
        assert results[0]["correct"][name]["numbers"] == results[1]["correct"][name]["numbers"], name
    # the sparse bug (one wrong row) is placed on the row it is in
    assert all(w["fc1::weight"][1][0] == 2 for w in results[0]["bugs"]["wrong_row"]["worst"])
    for res in results.values():
        plain = res["plain_root"]  # fully_shard on the children only: the root's gamma is a plain tensor
        assert plain["verdicts"] == ["pass", "pass"] and "gamma" in plain["reports"][0], plain["reports"]
        assert "gamma  " in plain["reports"][0] and "skipped" not in plain["reports"][0], plain["reports"]
    # module-local checks of modules=["fc1"] alone (the whole model over max_shadow_bytes): the bug is
    # named, the correct module passes, the whole-model tensors are skipped saying why
    for res in results.values():
        only = res["local_only"]
        assert only["wrong_sign"]["failing"] == [["fc1::weight"]], only["wrong_sign"]["reports"]
        assert only["custom_function"]["verdicts"] == ["pass"], only["custom_function"]["reports"]
        assert "max_shadow_bytes" in only["custom_function"]["reports"][0]
        for too_big in res["too_big"].values():  # modules=None, and "suspects" (not searched: a whole gather)
            assert too_big["verdicts"] == ["skipped"] and "pass `modules=[...]`" in too_big["reports"][0], too_big
    # the custom Function's module (an FSDP unit) was checked locally: its parameters gathered, its
    # local gradients averaged over ranks
    assert results[0]["bugs"]["wrong_sign"]["failing"][0] == ["fc1.weight", "fc1::weight"]


def test_module_local_checks_of_a_fused_attention_op_name_its_wrong_input(tmp_path) -> None:
    # qkv projection -> a torch.library custom op without float64 (tests/_attn_op.py) -> head, each
    # Linear a fully_shard unit: the op is found as the suspect and checked locally on every rank,
    # its input gradients (dq, dk, dv) averaged over ranks like the parameters' gradients
    results = run_two(tmp_path, "attention")
    for rank, res in results.items():
        for run in res["None"]:  # the correct op, 3 seeds x 2 steps: quiet
            assert run["verdicts"] == ["pass", "pass"] and all(run["reliable"]), (rank, run["reports"])
            assert run["suspects"] == {"attn": "custom op gwtest::attention.default"}
        for mode, wrong in (("dq", "attn::input[0]"), ("dk", "attn::input[1]")):
            (run,) = res[mode]
            local = [[n for n in failing if "::" in n] for failing in run["failing"]]
            assert local == [[wrong], [wrong]], (rank, mode, run["reports"])
            assert all(w[wrong][0] == "coordinate" and w[wrong][2] for w in run["worst"]), (rank, run["worst"])
    assert results[0]["dq"][0]["numbers"] == results[1]["dq"][0]["numbers"]
    # a registered reference is compared on each rank's own inputs and local gradients, and the ranks
    # agree on the worst: the same numbers and verdicts everywhere; dk is named by it too
    for rank, res in results.items():
        (correct,), (wrong,) = res["None+reference"], res["dk+reference"]
        assert all(v == "pass" for refs in correct["references"] for _, v, _ in refs), (rank, correct["references"])
        assert [[n for n, v, _ in refs if v == "fail"] for refs in wrong["references"]] == [["attn::input[1]"]] * 2
        assert [n for n, _, _ in wrong["references"][0]] == ["attn::output[0]", "attn::input[0]", "attn::input[1]",
                                                             "attn::input[2]"]
    assert results[0]["dk+reference"][0]["references"] == results[1]["dk+reference"][0]["references"]


def test_training_is_bit_identical_with_and_without_the_watch(tmp_path) -> None:
    results = run_two(tmp_path, "identical")
    for rank, res in results.items():  # the script asserted it per rank (parameters, Adam state, RNG)
        assert res["identical"] is True, (rank, res)
        assert res["verdicts"] == {"mlp_relu_dropout": ["pass"] * 3, "attention": ["pass"] * 3}, (rank, res)
        # a GradScaler(init_scale=1024) backward passes: the gradients were unscaled (else all 1024x off)
        assert res["scaled"] == ["pass", "pass"], (rank, res)
        assert len(res["scaled_local"]) == 2, (rank, res["scaled_local"])
        for verdict, local in res["scaled_local"]:  # module-local tensors checked, and quiet, under the scaler
            assert verdict == "pass" and any(n.endswith("::weight") for n in local), (rank, res["scaled_local"])
        assert res["budgeted"][0][0] == 0 and all(v == "pass" for _, _, v in res["budgeted"]), (rank, res)
    assert results[0]["budgeted"] == results[1]["budgeted"]  # the same steps and probes on both ranks


def test_a_rank_raising_inside_the_check_hangs_nothing(tmp_path) -> None:
    # rank 1's loss_fn raises inside the check: it re-raises its error, rank 0 raises at its next
    # collective instead of waiting; then the group still works (a barrier) and a planted bug raises
    # GradientCheckError on both ranks
    results = run_two(tmp_path, "raise", timeout=50)  # the group's own timeout is 60 s: no wait for it
    # modules=None: in the whole-model check; "suspects": the forward finding them fails on rank 1 alone
    # (it says so and finds none there; rank zero's suspects are used), then the check raises
    for key in ("flaky", "flaky_suspects"):
        assert results[1][key] == ["ZeroDivisionError", "planted failure on rank 1"], results
        assert results[0][key][0] == "_PeerFailed" and "other rank" in results[0][key][1], results
    assert results[0]["raise"] == results[1]["raise"] == "GradientCheckError"
    # a module-local check raising on rank 1 alone: that module is skipped on both ranks (each says why),
    # the next module is checked, training goes on (as without FSDP)
    for rank, why in ((0, "its module-local check raised on another rank"),
                      (1, "its module-local check raised RuntimeError: planted")):
        flaky = results[rank]["flaky_local"]
        assert flaky["verdicts"] == ["pass", "pass"], flaky["reports"]
        for report in flaky["reports"]:
            assert "body::lin.weight  skipped" in report and why in report, report
            assert "head::weight      pass" in report, report
    # sharding gradwatch cannot gather is refused at once, with what to use instead
    assert "tensor parallelism" in results[0]["tensor_parallel"] and "fully_shard" in results[0]["tensor_parallel"]


def test_capsules_are_written_by_rank_zero_and_replay_in_one_process(tmp_path) -> None:
    # both ranks pass the same directory; rank 0 alone writes: its own batch (module: its recorded
    # inputs and grad_out) with its own local gradients, before FSDP averaged them, so that one
    # process replays like with like (the same verdicts; the numbers are rank 0's part)
    import warnings

    from fsdp_script import attention_case
    from gradwatch.capsule import load_capsule
    from tests._attn_op import BUG
    from zoo import BUGS

    caps = tmp_path / "caps"
    results = run_two(tmp_path, "capsules", GW_CAPSULES=str(caps))
    for name, build, mode, keys in (("wrong_sign", BUGS["wrong_sign"], None, {"", "fc1"}),
                                    ("attention", attention_case, "dk", {"", "attn"})):
        assert results[1][name]["written"] == {}, name
        written = results[0][name]["written"]
        assert set(written) == keys, (name, written)
        assert sorted(os.listdir(caps / name)) == sorted(os.path.basename(p) for p in written.values())
        training = results[0][name]["verdicts"]
        assert training == results[1][name]["verdicts"] and "fail" in training.values()
        BUG["mode"] = mode
        try:
            for path in written.values():
                capsule = load_capsule(path)
                assert capsule.missing == () and capsule.step == 0, capsule.missing
                assert (capsule.processes["rank"], capsule.processes["world_size"]) == (0, 2)
                case = build(0)
                target = case.model if capsule.kind == "model" else dict(case.model.named_modules())[capsule.name]
                args = (case.loss_fn,) if capsule.kind == "model" else ()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    replayed = capsule.check(target, *args)
                assert any("written by process 0 of 2" in str(w.message) for w in caught)
                assert not replayed.ok and replayed.reliable, str(replayed)
                assert {n: t.verdict for n, t in replayed.tensors.items()} == {n: training[n] for n in replayed.tensors}
                # like with like: the recorded gradients are rank 0's own (the module's own backward on
                # rank 0's batch, or inputs and grad_out, gives the same probe values), not the mean over ranks
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    own = capsule.check(build(0).model if capsule.kind == "model" else target, *args, grads="autograd")
                recorded, mine = _probe_values(replayed), _probe_values(own)
                common = sorted(set(recorded) & set(mine), key=str)
                assert len(common) >= 4, (recorded, mine)
                assert torch.allclose(torch.tensor([recorded[k] for k in common]),
                                      torch.tensor([mine[k] for k in common]), rtol=1e-4, atol=1e-7), \
                    [(k, recorded[k], mine[k]) for k in common]
        finally:
            BUG["mode"] = None


def _probe_values(report) -> dict:
    """``<g, v>`` of each probe by (tensor, kind, element, direction seed)."""
    return {(n, p.kind, p.index, p.direction_seed): p.autograd for n, t in report.tensors.items() for p in t.probes}
