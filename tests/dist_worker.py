"""A few training steps of the retrieval model on 1 or N ranks, for tests/test_distributed.py.

Run under torchrun; rank 0 writes the global step losses and the token table (gathered
from every rank's shards) to ``--out``::

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py --store S --batch-size 8 --out o.pt
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> None:
    from torchrec_genrec.data.batching import SequenceDataset, make_dataloader
    from torchrec_genrec.data.splits import Split
    from torchrec_genrec.data.store import SequenceStore
    from torchrec_genrec.logging_utils import silence_known_noise
    from torchrec_genrec.models.retrieval import GenerativeRetrieval, RetrievalConfig
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.trainer import OptimConfig, build_optimizer, shard

    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pin", default="tokens:row_wise")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    silence_known_noise()
    ctx = init_distributed()
    store = SequenceStore.open(args.store)
    torch.manual_seed(0)
    config = RetrievalConfig(embedding_dim=16, num_blocks=2, num_heads=2, attention_dim=8, linear_dim=8,
                             dropout=0.0, action_mode="summed", num_negatives=16, action_loss_weight=0.5)
    model = GenerativeRetrieval(config, store.num_items, store.num_actions, 20, seed=7)
    optim = OptimConfig(sparse_lr=0.1, lr=1e-2)
    dmp = shard(model, ctx, optim, args.batch_size, pins=[args.pin])
    optimizer = build_optimizer(dmp, optim)
    loader = make_dataloader(SequenceDataset(args.store, Split.TRAIN, 20), args.batch_size, shuffle=True, seed=3,
                             rank=ctx.rank, world_size=ctx.world_size, drop_last=True)
    losses = []
    dmp.train()
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        loss, stats = dmp(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(stats["loss"]))
    from torchrec_genrec.train.evaluate import evaluate_retrieval

    dmp.eval()
    test = SequenceDataset(args.store, Split.TEST, 20, with_seen_items=True)
    # 80 test users in batches of 32: 3 batches, so the ranks score unequal numbers.
    evaluation = evaluate_retrieval(dmp.module.score, test, (10,), batch_size=args.eval_batch_size,
                                    return_ranks=True, progress=False)
    (weight,) = [v for k, v in dmp.state_dict().items() if k.endswith("tokens.weight")]
    full = torch.zeros(weight.size()) if ctx.rank == 0 else None
    weight.gather(0, full)
    if ctx.rank == 0:
        torch.save({"losses": losses, "table": full, "world_size": ctx.world_size, "eval": evaluation}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
