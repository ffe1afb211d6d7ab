"""CCL: clustering-guided contrastive learning, the method RetCCL trained its encoder with.

MoCo v2 (a query encoder trained by SGD, a momentum copy that encodes the keys, a queue of
past keys as negatives, a 2-layer MLP projection to a normalised 128-d space) plus the
clustering-guided part, in the line of CLD (Wang et al., CVPR 2021):

- a second projection (the *group head*) of the same backbone;
- spherical k-means over the momentum group features of the whole (all-rank) batch gives
  cluster centroids and a cluster label per tile;
- group-level InfoNCE, across views: the query view's group feature must pick the centroid
  of the cluster its *other* view (the key) fell into;
- weighted instance-level InfoNCE: queue negatives that fall into the query's own cluster
  are probably the same tissue, not true negatives, so they count with a smaller weight in
  the denominator: exp(q.k+/T) / (exp(q.k+/T) + sum_j w_j exp(q.n_j/T)).

The backbone is `engine.encoder.build_backbone(arch)`: the architecture lives once, in
engine, and `pretrain export` writes its weights in the released RetCCL layout.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.distributed import concat_all_gather, dist_info
from engine.encoder import ARCH_DIMS, build_backbone


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's head: Linear -> ReLU -> Linear (hidden width = backbone width)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class QueryNet(nn.Module):
    """Backbone + instance head + group head; both outputs L2-normalised."""

    def __init__(self, arch: str, proj_dim: int):
        super().__init__()
        self.backbone = build_backbone(arch)
        feat_dim = ARCH_DIMS[arch]
        self.instance_head = projection_head(feat_dim, proj_dim)
        self.group_head = projection_head(feat_dim, proj_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)  # N x F (avgpool features)
        inst = F.normalize(self.instance_head(h), dim=1)  # N x D
        group = F.normalize(self.group_head(h), dim=1)  # N x D
        return inst, group


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Centroids (k x D, unit length) of unit rows x (N x D) by spherical k-means.

    Seeded by `generator` (a CPU generator), so every rank given the same x and the same
    seed gets the same centroids. A cluster that empties keeps its previous centroid."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={len(x)}")
    init = torch.randperm(len(x), generator=generator)[:k].to(x.device)
    centroids = x[init].clone()  # k x D
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)  # N
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # k x D
        counts = torch.bincount(assign, minlength=k)  # k
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
    return centroids


def weighted_info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    same: torch.Tensor,
    temperature: float,
    same_cluster_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance-level InfoNCE of queries q (N x D) against their own keys k (N x D) and the
    negatives (K x D), where a negative in the query's own cluster (`same`, N x K) counts with
    `same_cluster_weight` in the denominator (it is probably the same tissue). Returns (loss,
    logits N x (1+K), the positive first)."""
    l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
    l_neg = q @ negatives.T  # N x K
    log_w = torch.where(same, math.log(same_cluster_weight) if same_cluster_weight > 0 else -math.inf, 0.0)
    logits = torch.cat([l_pos / temperature, l_neg / temperature + log_w], dim=1)  # N x (1+K)
    zeros = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float(), zeros), logits


class CCL(nn.Module):
    """MoCo v2 + clustering-guided group loss and weighted negatives.

    arch:                torchvision ResNet name (default: resnet50)
    proj_dim:            width of the normalised projections (default: 128)
    queue_size:          number of negative keys in the queue (default: 65536)
    momentum:            momentum of the key encoder update (default: 0.999)
    temperature:         instance-level softmax temperature (default: 0.07)
    num_clusters:        k-means clusters over the global batch (default: 32; capped at N/2)
    kmeans_iters:        k-means iterations per step (default: 10)
    group_temperature:   group-level softmax temperature (default: 0.2)
    group_weight:        weight of the group loss in the total (default: 0.25)
    same_cluster_weight: weight of queue negatives in the query's cluster (default: 0.5;
                         1.0 = plain MoCo InfoNCE, 0.0 = drop them)
    """

    def __init__(
        self,
        arch: str = "resnet50",
        proj_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.07,
        num_clusters: int = 32,
        kmeans_iters: int = 10,
        group_temperature: float = 0.2,
        group_weight: float = 0.25,
        same_cluster_weight: float = 0.5,
    ):
        super().__init__()
        if not 0.0 <= same_cluster_weight <= 1.0:
            raise ValueError(f"same_cluster_weight must be in [0, 1], got {same_cluster_weight}")
        if queue_size < 1 or num_clusters < 1:
            raise ValueError("queue_size and num_clusters must be positive")
        self.arch = arch
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = temperature
        self.num_clusters = num_clusters
        self.kmeans_iters = kmeans_iters
        self.group_temperature = group_temperature
        self.group_weight = group_weight
        self.same_cluster_weight = same_cluster_weight
        # MoCo's shuffle-BN across ranks; the trainer turns it off when SyncBN does the job
        self.shuffle_bn = True

        self.encoder_q = QueryNet(arch, proj_dim)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False

        # a fixed generator so the random initial queue does not depend on the global RNG
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim, generator=gen), dim=1))  # K x D
        self.register_buffer(
            "queue_group", F.normalize(torch.randn(queue_size, proj_dim, generator=gen), dim=1)
        )  # K x D
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key params <- m * key params + (1 - m) * query params (call after each optimiser step)."""
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)
        # BN running statistics follow the query encoder the same way
        for bq, bk in zip(self.encoder_q.buffers(), self.encoder_k.buffers()):
            if bk.dtype.is_floating_point:
                bk.mul_(self.momentum).add_(bq, alpha=1.0 - self.momentum)
            else:
                bk.copy_(bq)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, group_keys: torch.Tensor) -> None:
        """Write keys (N x D) at the pointer, wrapping around the end of the queue."""
        n = keys.shape[0]
        if n > self.queue_size:
            raise ValueError(
                f"a global batch of {n} keys does not fit a queue of {self.queue_size}; raise the queue size"
            )
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % self.queue_size  # N
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_group[idx] = group_keys.to(self.queue_group.dtype)
        self.queue_ptr.fill_((ptr + n) % self.queue_size)

    @torch.no_grad()
    def _shuffled_keys(self, im_k: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Key features with the batch shuffled across ranks (MoCo's shuffle-BN), so BN
        statistics of the key encoder cannot leak which key matches which query. One process:
        no shuffle (BN statistics then come from the local batch, as in MoCo on one GPU)."""
        rank, world = dist_info()
        if world == 1 or not self.shuffle_bn:
            return self.encoder_k(im_k)
        n = im_k.shape[0]
        im_all = concat_all_gather(im_k)  # W*N x 3 x H x W
        perm = torch.randperm(len(im_all), generator=generator).to(im_k.device)  # same on every rank
        unperm = torch.argsort(perm)
        k, kg = self.encoder_k(im_all[perm[rank * n : (rank + 1) * n]])  # N x D each
        k_all, kg_all = concat_all_gather(k)[unperm], concat_all_gather(kg)[unperm]  # W*N x D
        return k_all[rank * n : (rank + 1) * n], kg_all[rank * n : (rank + 1) * n]

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, seed: int, encoder_q: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch of two views (N x 3 x H x W each, normalised floats).

        seed: per-step seed (same on every rank) for k-means and the shuffle.
        encoder_q: the query net to call, e.g. its DistributedDataParallel wrapper.
        """
        encoder_q = encoder_q if encoder_q is not None else self.encoder_q
        rank, world = dist_info()
        gen = torch.Generator().manual_seed(seed)
        n = im_q.shape[0]

        q, q_group = encoder_q(im_q)  # N x D, N x D
        with torch.no_grad():
            k, k_group = self._shuffled_keys(im_k, gen)  # N x D, N x D
            k_all, k_group_all = concat_all_gather(k), concat_all_gather(k_group)  # W*N x D
            clusters = min(self.num_clusters, max(1, len(k_all) // 2))
            centroids = spherical_kmeans(k_group_all.float(), clusters, self.kmeans_iters, gen)  # C x D
            if world > 1:
                # every rank computed the same; rank 0's copy guards against non-deterministic kernels
                dist.broadcast(centroids, src=0)
            assign = (k_group_all.float() @ centroids.T).argmax(dim=1)[rank * n : (rank + 1) * n]  # N
            queue_assign = (self.queue_group.float() @ centroids.T).argmax(dim=1)  # K

        # instance level: positive = own key, negatives = queue, weighted by cluster
        same = assign[:, None] == queue_assign[None, :]  # N x K
        loss_inst, logits = weighted_info_nce(
            q, k, self.queue.clone().detach(), same, self.temperature, self.same_cluster_weight
        )

        # group level, across views: query view -> centroid of its key view's cluster
        group_logits = q_group @ centroids.to(q_group.dtype).T / self.group_temperature  # N x C
        loss_group = F.cross_entropy(group_logits.float(), assign)

        loss = loss_inst + self.group_weight * loss_group
        self.enqueue(k_all, k_group_all)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == 0).float().mean()
        stats = {
            "loss": loss.detach(),
            "loss_instance": loss_inst.detach(),
            "loss_group": loss_group.detach(),
            "acc_instance": acc,
            "clusters": clusters,
        }
        return loss, stats
