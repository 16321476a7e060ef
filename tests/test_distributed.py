"""Start-up plans from flags and environments (pure: nothing is started here; the real
multi-process run is tests/train/test_multiprocess.py)."""

import pytest

from sdxl_jax import distributed as dist

SLURM = {"SLURM_JOB_ID": "77", "SLURM_NODELIST": "gpu[01-02]", "SLURM_NODEID": "1"}


def resolve(env, **kw):
    return dist.resolve(env, tpu=False, **kw)


def test_no_environment_is_one_process():
    plan = resolve({})
    assert plan.mode == "single" and not plan.multi


def test_explicit_flags_and_environment():
    plan = resolve({}, coordinator="10.0.0.2:1234", num_processes=4, process_id=3)
    assert (plan.mode, plan.coordinator, plan.num_processes, plan.process_id) == (
        "explicit", "10.0.0.2:1234", 4, 3,
    )  # fmt: skip
    env = {"SDXL_COORDINATOR": "h:9", "SDXL_NUM_PROCESSES": "2", "SDXL_PROCESS_ID": "1",
           "SDXL_LOCAL_DEVICE_IDS": "2,3"}  # fmt: skip
    plan = resolve(env)
    assert (plan.coordinator, plan.num_processes, plan.process_id) == ("h:9", 2, 1)
    assert plan.local_device_ids == (2, 3)
    # flags win over the environment; JAX's own variable names work too
    assert resolve(env, process_id=0).process_id == 0
    jax_env = {"JAX_COORDINATOR_ADDRESS": "c:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}
    assert resolve(jax_env).process_id == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(coordinator="h:1", num_processes=2), "process_id"),
        (dict(num_processes=2, process_id=0), "coordinator"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"not in \[0, 2\)"),
        (dict(coordinator="nohost", num_processes=2, process_id=0), "HOST:PORT"),
        (dict(num_processes=0), "at least 1"),
        (dict(coordinator="h:1", num_processes=2, process_id=0, local_device_ids="0,x"), "comma"),
    ],
)
def test_incomplete_or_wrong_settings_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve({}, **kw)


def test_bad_integer_in_the_environment():
    with pytest.raises(ValueError, match="SDXL_NUM_PROCESSES='two'"):
        resolve({"SDXL_NUM_PROCESSES": "two"})


def slurm(ntasks, per_node, local, **more):
    return {**SLURM, "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(local + 8),
            "SLURM_LOCALID": str(local), "SLURM_TASKS_PER_NODE": per_node, **more}  # fmt: skip


def test_slurm_one_task_per_node_takes_all_its_gpus():
    # JAX's own detection would give this task GPU 0 only (local_device_ids=[SLURM_LOCALID]).
    plan = resolve(slurm(2, "1(x2)", 0, SLURM_GPUS_ON_NODE="8"))
    assert plan.mode == "slurm" and plan.local_device_ids == tuple(range(8))
    assert (plan.num_processes, plan.process_id) == (2, 8)
    plan = resolve(slurm(2, "1(x2)", 0, CUDA_VISIBLE_DEVICES="0,1,2,3"))
    assert plan.local_device_ids == (0, 1, 2, 3)
    plan = resolve(slurm(2, "1(x2)", 0, SLURM_GPUS_PER_NODE="h100:4"))
    assert plan.local_device_ids == (0, 1, 2, 3)


def test_slurm_one_task_per_gpu_takes_its_own():
    plan = resolve(slurm(16, "8(x2)", 5, SLURM_GPUS_ON_NODE="8"))
    assert plan.local_device_ids == (5,)
    # SLURM bound one GPU to the task (--gpus-per-task=1): it is device 0 of what it sees
    plan = resolve(slurm(16, "8(x2)", 5, CUDA_VISIBLE_DEVICES="5"))
    assert plan.local_device_ids == (0,)
    # uneven node lists: this node (SLURM_NODEID=1) has the second entry's count
    plan = resolve(slurm(12, "8,4", 3, SLURM_GPUS_ON_NODE="4"))
    assert plan.local_device_ids == (3,)


def test_slurm_mismatch_and_override():
    with pytest.raises(ValueError, match="ntasks-per-node=8"):
        resolve(slurm(4, "2(x2)", 1, SLURM_GPUS_ON_NODE="8"))
    env = {**slurm(4, "2(x2)", 1, SLURM_GPUS_ON_NODE="8"), "SDXL_LOCAL_DEVICE_IDS": "4,5,6,7"}
    assert resolve(env).local_device_ids == (4, 5, 6, 7)


def test_a_single_slurm_task_and_a_tpu_vm():
    assert resolve(slurm(1, "1", 0)).mode == "single"
    assert dist.resolve({}, tpu=True).mode == "tpu"
    # an explicit coordinator wins over detection
    plan = dist.resolve({}, tpu=True, coordinator="h:1", num_processes=2, process_id=1)
    assert plan.mode == "explicit"
