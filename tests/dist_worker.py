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
    from torchrec_genrec.config import load_config
    from torchrec_genrec.logging_utils import silence_known_noise
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig, RetrievalTask
    from torchrec_genrec.train.trainer import Trainer, seed_everything

    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pin", default="tokens:row_wise")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    silence_known_noise()
    cfg = load_config(RetrievalRecipeConfig, None, [
        f"data.dataset={args.store}", "data.max_seq_len=20", "model.embedding_dim=16", "model.num_blocks=2",
        "model.num_heads=2", "model.attention_dim=8", "model.linear_dim=8", "model.dropout=0.0",
        "model.action_mode=summed", "model.num_negatives=16", "model.action_loss_weight=0.5",
        "train.optim.sparse_lr=0.1", "train.optim.lr=1e-2", f"train.batch_size={args.batch_size}",
        "train.seed=7", "train.checkpoint=false", "train.tensorboard=false", "train.progress=false",
        f"train.output_dir={os.path.dirname(os.path.abspath(args.out))}/run", "eval.ks=[10]",
        f"eval.batch_size={args.eval_batch_size}", f"plan.pins=[\"{args.pin}\"]"])
    seed_everything(0)
    task = RetrievalTask(cfg, args.store)
    trainer = Trainer(task, cfg.train, pins=cfg.plan.pins)
    ctx = trainer.ctx
    data = task.train_data(ctx.rank, ctx.world_size)
    data.set_epoch(0)
    losses = []
    trainer.model.train()
    for step, batch in enumerate(data):
        if step == args.steps:
            break
        _, means, _ = trainer.train_step(batch)
        losses.append(float(means["loss"]))
    trainer.model.eval()
    # 80 test users in batches of 32: 3 batches, so the ranks score unequal numbers.
    evaluation = task.evaluate(trainer.model, "test", return_ranks=True)
    (weight,) = [v for k, v in trainer.model.state_dict().items() if k.endswith("tokens.weight")]
    full = torch.zeros(weight.size()) if ctx.rank == 0 else None
    weight.gather(0, full)
    if ctx.rank == 0:
        torch.save({"losses": losses, "table": full, "world_size": ctx.world_size, "eval": evaluation}, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
