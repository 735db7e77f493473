"""One feature store filled by several processes at once (torch.distributed, launched by torchrun).

    torchrun --nproc_per_node 2 -m dtrak_core featurize --root <folder> --output-fn square --K 100

Each rank fills its own contiguous share of the store's slices (`FeatureStore.part_rows`), records
them in its own done file and logs `rank R/N filled rows A-B` (R counts from 0, rows inclusive);
rank 0 then merges the done files, seals the store (its sha256) and registers it in the manifest.
The result equals a single-process run bit for bit: every slice is computed whole by the same code
whichever process computes it. A killed run resumes per slice, under any number of processes (or
none: a plain `featurize` merges what the ranks recorded). Backend: gloo on CPU, NCCL on CUDA; give
each process one thread on a CPU (`OMP_NUM_THREADS=1`, torchrun's default).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from dtrak_core.attribution.store import FeatureStore


def launched() -> bool:
    """True in a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> tuple[int, int]:
    """(rank, world) of this process, joining torchrun's process group (env://) on first call."""
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _nothing_left(rows):
    raise RuntimeError("every slice is done; nothing should be featurized here")


def fill(store: FeatureStore, make_featurizer, inputs, log=print) -> FeatureStore:
    """Fill `store` together with the other ranks (each calls this with the same arguments); every
    rank returns the complete store. make_featurizer(): -> `inputs[a:b] -> (b - a, k)`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        store.merge_rank_done()  # rows a killed run recorded, before anyone reads the mask
    dist.barrier()
    a, b = store.part_rows(rank, world)
    if not store.complete:
        store.fill(make_featurizer(), inputs, show_bar=False, part=(rank, world))
    log(f"rank {rank}/{world} filled rows {a}-{b - 1}" if b > a else f"rank {rank}/{world} filled no rows "
        f"(the store has fewer slices than ranks)", flush=True)
    dist.barrier()
    if rank == 0 and not store.complete:
        store.fill(_nothing_left, inputs, show_bar=False)  # merges the ranks' done files, seals the store
    dist.barrier()
    return store if rank == 0 else FeatureStore.open(store.path)


def build_store(root: str, unet, scheduler, setting, device: str = "cpu", slice_size: int = 256) -> dict:
    """`build.build_store` across ranks: the store of `setting` for the model folder `root`, filled by
    all ranks and registered in the manifest by rank 0; the manifest's fields as saved (every rank).
    device "cuda": each rank computes on its local GPU (NCCL)."""
    from dtrak_core.attribution.features import Featurizer
    from dtrak_core.folder import ModelFolder
    from dtrak_core.model.unet import checkpoint_hash

    rank, world = init(device)
    train_set = ModelFolder.load(root).training_set()
    rel = os.path.join("stores", setting.slug)
    path = os.path.join(root, rel)
    identity = FeatureStore.identity(setting, checkpoint_hash(unet), train_set.fingerprint)
    t0 = time.perf_counter()
    if rank == 0:  # one process creates the store, the others open (and verify) it
        FeatureStore.create(path, identity, len(train_set), setting.k, slice_size=slice_size)
    dist.barrier()
    store = FeatureStore.create(path, identity, len(train_set), setting.k, slice_size=slice_size)
    fill(store, lambda: Featurizer(unet, scheduler, setting, device=device), train_set.images)
    seconds = time.perf_counter() - t0
    if rank == 0:
        ModelFolder.edit(root, lambda folder: folder.add_store(rel, seconds))
    dist.barrier()
    manifest = ModelFolder.load(root).to_dict()
    dist.destroy_process_group()
    return manifest
