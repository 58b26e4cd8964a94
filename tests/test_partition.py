"""Module groups owned by workers (``cluster.partition: groups``): the dealing, and the exchange between
owners, checked with torch.distributed processes and no Ray."""

import pytest

from hetero_ray.errors import SpecError
from hetero_ray.train.partition import balance, resolve


def test_partition_deals_groups_to_the_least_loaded_and_refuses_more_workers_than_groups():
    # paper-scale Llama shapes: 3 MLP groups of 18432 tokens, q/o of 8192, k/v of 5120
    costs = {"gate": 18432, "up": 18432, "down": 18432, "q": 8192, "o": 8192, "k": 5120, "v": 5120}
    two, four = balance(costs, 2), balance(costs, 4)
    assert sorted(g for o in four for g in o) == sorted(costs)
    loads = [sum(costs[g] for g in o) for o in four]
    assert max(loads) / sum(costs.values()) < 0.3  # the heaviest owner: under 0.3 of the work (ideal 0.25)
    assert max(sum(costs[g] for g in o) for o in two) / sum(costs.values()) < 0.55
    assert balance(costs, 4) == four  # deterministic
    assert resolve("auto", 8, costs) is None and resolve("replicate", 2, costs) is None
    assert resolve("auto", 1, costs) is None and resolve("groups", 2, costs) == two
    with pytest.raises(SpecError, match="8 workers but only 7 module groups"):
        resolve("groups", 8, costs)


def _owner(rank: int, world: int, spec_json: dict, init: str, out: str, extra_rank: int) -> None:
    """One owner process: its groups' nets only, trained by ``fit`` with the exchange."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from hetero_ray.runners.prepare import build_net, objective_weights, plan_costs, prepare_groups
    from hetero_ray.spec import FusionSpec
    from hetero_ray.train.partition import GroupExchange, exchange_shapes, owner_of_extra
    from hetero_ray.train.replay import load_tokenizer
    from hetero_ray.train.target import load_target
    from hetero_ray.train.trainer import FusionObjective, fit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    spec = FusionSpec.model_validate(spec_json)
    p = prepare_groups(spec)
    all_groups = p.plan.groups()
    own = resolve("groups", world, plan_costs(p.plan, p.block))[rank]
    groups = {n: g for n, g in p.groups.items() if n in own}
    extra = [q for q, r in owner_of_extra(list(p.target.modules), world).items() if r == rank]
    net = build_net(spec, p.plan, p.block, groups, p.target, extra)
    tok = load_tokenizer(spec.target.base)
    from hetero_ray.runners.prepare import replay_examples

    exchange = GroupExchange(exchange_shapes(p.plan, p.target, extra_rank))
    objective = FusionObjective(load_target(spec.target.base, p.target), groups, spec.method,
                                replay_examples(spec, tok), tok.pad_token_id, spec.seed, objective_weights(spec),
                                extra_modules=p.plan.fused_modules() + (list(p.target.modules) if extra_rank else []),
                                exchange=exchange, n_groups=len(all_groups))
    history = fit(net, objective, spec.training, spec.seed, rank=rank, world=world)
    deltas, _ = objective.final_deltas(net)
    if rank == 0:
        save_file(deltas, out)
        import json
        from pathlib import Path

        Path(out + ".json").write_text(json.dumps([[h["lm_loss"], h["rdm"], h["alpha"]] for h in history]))
    dist.destroy_process_group()


@pytest.mark.parametrize("extra_rank,grad_accum,epochs", [(0, 4, 2), (2, 5, 2), (2, 11, 1)],
                         ids=["even", "added-rank-uneven", "a-worker-without-micro-batches"])
def test_two_owners_train_the_same_adapter_as_one_process(zoo, tmp_path, extra_rank, grad_accum, epochs):
    """2 processes, each owning its groups (and half of the added rank), exchanging dB and gradients over
    gloo, with the global norm clipped: the deltas, losses, RDM and alphas of one process holding every net.
    12 micro-batches an epoch: windows of 4 split 2/2; over 2 epochs, windows of 5 split 3/2 and the last
    (4) 2/2; over 1 epoch, windows of 11 split 6/5 and the last (1) 1/0."""
    import json

    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from hetero_ray.runners.prepare import build_net, objective_weights, prepare_groups, replay_examples
    from hetero_ray.train.replay import load_tokenizer
    from hetero_ray.train.target import load_target
    from hetero_ray.train.trainer import FusionObjective, fit
    from tests.helpers import make_spec

    spec = make_spec(zoo, tmp_path / "out", **{"training.max_grad_norm": 0.05, "training.epochs": epochs,
                                               "method.extra_rank": extra_rank, "training.grad_accum": grad_accum})
    out = str(tmp_path / "owners.safetensors")
    mp.spawn(_owner, args=(2, spec.model_dump(mode="json"), f"file://{tmp_path / 'store'}", out, extra_rank),
             nprocs=2, join=True)
    torch.set_num_threads(1)
    p = prepare_groups(spec)
    assert len(p.groups) >= 2
    tok = load_tokenizer(spec.target.base)
    net = build_net(spec, p.plan, p.block, p.groups, p.target)
    objective = FusionObjective(load_target(spec.target.base, p.target), p.groups, spec.method,
                                replay_examples(spec, tok), tok.pad_token_id, spec.seed, objective_weights(spec),
                                extra_modules=list(p.target.modules) if extra_rank else ())
    splits = [[len(s.replay) for s in objective.steps(spec.training, spec.seed, r, 2)] for r in range(2)]
    assert splits[1][-1] == (0 if grad_accum == 11 else splits[0][-1])  # each case is what its name says
    assert grad_accum == 4 or splits[0][0] > splits[1][0]
    history = fit(net, objective, spec.training, spec.seed)
    one, _ = objective.final_deltas(net)
    two = load_file(out)
    assert one.keys() == two.keys()
    scale = max(float(v.abs().max()) for v in one.values())
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4 * scale)
    logged = json.loads((tmp_path / "owners.safetensors.json").read_text())
    torch.testing.assert_close([x[0] for x in logged], [h["lm_loss"] for h in history], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close([x[1] for x in logged], [h["rdm"] for h in history], rtol=1e-4, atol=1e-6)
    assert [x[2] for x in logged][-1].keys() == history[-1]["alpha"].keys()


def test_uneven_windows_weigh_every_micro_batch_alike():
    """Each worker divides its micro-batch losses so that the mean over workers is the window's mean."""
    from hetero_ray.spec import TrainingSpec
    from hetero_ray.train.trainer import plan_steps

    training = TrainingSpec(epochs=1, batch_size=1, grad_accum=3)
    for world in (1, 2, 3, 4):
        shares = [plan_steps(7, 0, training, 0, r, world) for r in range(world)]
        for i in range(len(shares[0])):
            steps = [s[i] for s in shares]
            total = steps[0].replay_micro
            assert sum(len(s.replay) for s in steps) == total
            # sum over workers of (micro-batches / scale), averaged over workers: 1 per micro-batch overall
            assert abs(sum(len(s.replay) / s.scale("replay") for s in steps) / world - 1.0) < 1e-12
