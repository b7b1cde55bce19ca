"""How a worker sizes itself: CPU threads shared among the model's workers, and one GPU per
worker on a host with several (TorchServe hands each worker a gpu_id; no GPU is needed to
check the choice)."""

from __future__ import annotations


from llama_settings import HandlerSettings, engine_config, workers_sharing_cpus


def test_threads_are_the_cores_divided_among_as_many_workers_as_the_model_may_scale_to():
    assert workers_sharing_cpus({"minWorkers": 1, "maxWorkers": 4}) == 4
    assert workers_sharing_cpus({"minWorkers": 2, "maxWorkers": 1}) == 2
    assert workers_sharing_cpus(None) == 1
    settings = HandlerSettings()
    assert engine_config(settings, batch_size=8, n_workers=2, gpu_id=None, cpus=16).n_threads == 8
    assert engine_config(settings, batch_size=8, n_workers=4, gpu_id=None, cpus=2).n_threads == 1
    assert engine_config(HandlerSettings(n_threads=3), batch_size=8, n_workers=4, gpu_id=None, cpus=2).n_threads == 3


def test_each_worker_of_a_multi_gpu_host_is_pinned_to_the_gpu_torchserve_gave_it():
    settings = HandlerSettings(n_gpu_layers=999)
    for gpu_id in range(4):   # as TorchServe assigns them round robin over 4 GPUs
        config = engine_config(settings, batch_size=64, n_workers=4, gpu_id=gpu_id, cpus=16)
        assert (config.main_gpu, config.split_mode) == (gpu_id, 0)   # split mode none: that GPU only


def test_a_tensor_split_spreads_one_worker_over_the_gpus_instead():
    settings = HandlerSettings(n_gpu_layers=999, tensor_split=[0.5, 0.5])
    config = engine_config(settings, batch_size=64, n_workers=1, gpu_id=0, cpus=16)
    assert config.split_mode == 1 and config.tensor_split == [0.5, 0.5]


def test_a_cpu_only_model_ignores_the_gpu_id():
    config = engine_config(HandlerSettings(), batch_size=8, n_workers=1, gpu_id=1, cpus=2)
    assert config.n_gpu_layers == 0 and config.main_gpu == 0
