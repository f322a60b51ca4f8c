"""The one default config. Presets and methods in `experiments/` hold only differences from it.

Every default lives here and nowhere else: code reads `cfg.section.key`, never
`getattr(cfg, key, default)`, so a typo fails instead of silently using a default.
Sizes are in *latent frames* (the unit the model and the cache count in); in the embedded
world a latent frame is one pixel frame (there is no VAE), at Wan scale it stands for 4 video
frames (`model.video_frames_per_latent`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    source: str = "world"  # world | folder (registry: cf.data.DATA_SOURCES)
    folder: str | None = None  # a folder of mp4/webm/gif when source=folder
    skip_bad_files: bool = False  # folder: skip unreadable videos (reported) instead of failing
    height: int = 32
    width: int = 32
    fps: int = 8  # frames per second of world time; turns seconds into frames everywhere
    clip_frames: int = 16  # frames per training clip
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0  # training stream seed: sample i is the world drawn from (seed, i)
    eval_seed: int = 1_000_000  # held-out clips: the worlds drawn from (eval_seed, i)
    eval_clips: int = 32  # how many held-out clips the DataModule serves for validation
    # --- the synthetic world (cf/data/world.py) ---
    pano_frames: float = 4.0  # panorama width in frame widths
    texture: str = "mixed"  # procedural | photo | mixed (photos ship with scikit-image)
    n_landmarks: int = 6
    n_subjects: int = 2
    camera_speed: float = 4.0  # pixels per frame
    camera_path: str = "pingpong"  # pingpong | random | revisit (registry: cf.data.world.CAMERA_PATHS)
    revisit_lags: list[int] = field(default_factory=lambda: [8, 16, 32, 48])


@dataclass
class ModelConfig:
    channels: int = 3  # channels of a (latent) frame: 3 for pixels, 16 for Wan's VAE latents
    patch_size: int = 8  # spatial patch; temporal patch is 1 latent frame
    dim: int = 128
    depth: int = 4
    heads: int = 4
    ffn_dim: int = 512
    frames_per_chunk: int = 2  # latent frames generated per rollout chunk
    video_frames_per_latent: int = 1  # 4 for Wan's VAE; only used to report video FPS
    prediction: str = "x0"  # x0 | velocity
    # edm: the x0 output is preconditioned as in EDM (Karras et al. 2022), rewritten for rectified flow:
    # x0 = c_skip(s) * x_t + c_out(s) * net(c_in(s) * x_t) (x0 only); none: x0 = net(x_t). At tiny, edm
    # leaves visible noise in the samples (continuation 13.4 dB vs 17.2 at 3k steps): near s = 0 the
    # network must output the per-pixel noise, 192 values per patch through a 128-wide token, which
    # it cannot; plain x0 only has to output the image, which compresses (DESIGN.md section 7)
    precondition: str = "none"
    sigma_data: float = 0.5  # RMS of the data (the world's frames: ~0.5 in [-1, 1])
    positions: str = "world"  # world (panorama coordinates from the camera) | frame
    # spatial positions (RoPE and the world embedding) count in units of patch_size / position_scale:
    # with patch 8, 8 = pixels, so a half-patch camera offset turns the fastest rotary pair by 4 rad
    # and "what was at this spot" is a sharp lookup; 1 = patch units (Wan's grid indices)
    position_scale: float = 8.0
    text_encoder: str = "learned"  # learned | minilm | none
    text_tokens: int = 8  # prompt length in tokens for the learned encoder
    vocab_size: int = 512
    text_dim: int = 384  # width of the text features fed to the model (minilm: 384)
    camera: bool = True  # condition on the per-frame camera position
    qk_norm: bool = True
    rope_theta: float = 10000.0
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 | fp64
    compile: bool = False
    attention_backend: str = "auto"  # auto | math | flash | efficient | cudnn (SDPA kernels)
    # --- Wan2.1's function (cf.wan reads real Wan checkpoints into this network: docs/wan.md). The
    # defaults are the native network; the keys below only change it when set (cf.wan sets them all).
    # with qk_norm: RMSNorm of q and k over all heads at once (weight [dim], Wan) instead of per head
    qk_norm_across_heads: bool = False
    freq_dim: int | None = None  # width of the timestep sinusoid (Wan: 256); None: model.dim
    # prepend a learned null token to the cross-attention context (guidance's null condition attends to
    # it); false (Wan): the context is the text alone and the unconditional branch is Cond.null_text
    null_token: bool = True
    # 0: text tokens attended by their mask; N (Wan: 512): text features zero-padded to N tokens, all attended
    text_pad_tokens: int = 0
    # time embedding, modulation, norms and gated residuals in fp32 whatever model.dtype (as Wan keeps them)
    fp32_modulation: bool = False


@dataclass
class MemoryConfig:
    policy: str = "slowfast"  # full | sliding | sink | slowfast (registry: cf.memory.POLICIES)
    sink_frames: int = 2  # N_s: attention sink (sink, slowfast)
    window_frames: int = 4  # last W frames (sliding, sink) = fast FIFO N_l (slowfast)
    slow_frames: int = 8  # N_c: slow memory capacity (slowfast)
    # promote when cosine(mean key, last promoted) < tau. The paper's 0.95 is calibrated to Wan's keys;
    # tiny's mean keys share a large common part (cosine 0.993-0.999 between frames 4 apart, 0.98 at
    # 24), so 0.95 never promotes and slow-fast degrades to sink + window (see experiments/presets/tiny.yaml)
    tau: float = 0.998
    promotion: str = "similarity"  # similarity | uniform
    promote_every: int = 2  # consolidation checked every k chunks
    promote_after: int = 4  # no promotion before this latent frame (paper: 6)
    bounded_positions: bool = True  # RoPE time index stays in [0, N_s + N_c + N_l)


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    train_shift: float = 3.0  # timestep sampling shift for teacher training
    sample_shift: float = 3.0  # sigma-schedule shift for the teacher's multi-step sampler
    teacher_steps: int = 12
    student_timesteps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    student_shift: float = 5.0  # warp of the student's timesteps
    cfg_scale: float = 1.0  # classifier-free guidance of the teacher at sampling time


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock cap per stage (stops cleanly, checkpoint kept)
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    ema: float = 0.999  # 0 disables the EMA copy
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "auto"  # auto | 32-true | bf16-mixed | 16-mixed | 64-true
    log_every: int = 10
    ckpt_every: int = 100
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


@dataclass
class TeacherConfig:
    context_frames: int = 16  # longest history the teacher is trained with (the knob)
    min_context_frames: int = 0
    target_chunks: int = 1  # target window, bidirectional inside
    cond_drop: float = 0.1  # classifier-free guidance dropout of text and camera
    memory: str = "full"  # policy the teacher reads its training history through (memory.* knobs apply)
    # dense: every chunk of the clip is a target in one forward over [clean frames ; noisy frames],
    # each noisy chunk reading the clean chunks before it (its history of up to context_frames, through
    # the policy), exactly as a cached rollout would: 9 targets per clip at tiny for ~5x the compute of
    # one. On this CPU steps, not targets, limit learning (550 dense steps in 8.7 min: 12.8 dB; 3,000
    # single-window steps in 12 min: 18.0), so tiny keeps false: one target window after a random-length
    # history
    dense: bool = False


@dataclass
class ErftConfig:
    enabled: bool = True
    steps: int = 300
    bins: int = 50  # timestep bins of the residual bank
    bank_size: int = 500  # entries per bin; full bin replaces its nearest entry (L2)
    p_history: float = 0.9
    p_target: float = 0.9
    p_noise: float = 0.01
    p_clean: float = 0.5  # fraction of samples left unperturbed
    collect_every: int = 1
    history_sigma_max: float = 0.3  # history residuals come from bins below this noise level


@dataclass
class StudentConfig:
    """Student initialisation: the teacher's weights fitted to its own ODE trajectories (stage `student`),
    and the evaluation every generator stage (student, cdmd1, cdmd2) writes to eval.json."""

    steps: int = 200  # optimizer steps of the ODE regression
    lr: float = 2e-4
    ema: float = 0.99  # EMA of the student (trainer.ema's 0.999 would barely move in 200 steps)
    ode_pairs: int = 64  # teacher ODE trajectories (noise -> video) sampled for the initialisation
    rollout_chunks: int = 4  # chunks per trajectory
    # clean world frames every student rollout continues (ODE pairs, DMD rollouts, evaluation), a
    # multiple of model.frames_per_chunk; 0: from noise alone (text-to-video, as the paper). A tiny
    # teacher cannot invent a world from a prompt, but continues one it has seen (DESIGN.md 7).
    context_frames: int = 4
    guidance: float = 3.0  # classifier-free guidance of the teacher while sampling them
    max_minutes: float | None = None  # wall-clock cap of the stage's training (stops cleanly)
    eval_videos: int = 2  # held-out worlds (seeds data.eval_seed + i) each generator stage is scored on
    eval_seconds: float = 10.0  # length of each evaluation video
    eval_backbone: str = "pixels"  # feature backbone of the evaluation's consistency scores


@dataclass
class CdmdConfig:
    """Contextual DMD. A step is one optimizer update (critic or generator): every batch rolls the
    student out once and takes one update; batch k updates the generator when
    k % (critic_ratio + 1) == critic_ratio. stage*_steps count generator updates."""

    # tiny fits its budget on 2 CPU cores (one thread: cdmd1 ~5 min at 0.6 s/step, cdmd2 ~8 min at
    # ~1.2 s/step); the paper's ratio 5 and EMA 0.99 assume thousands of updates (small.yaml uses them)
    stage1_steps: int = 120
    stage2_steps: int = 120  # as in the recorded tiny runs; stage2_max_minutes may end it first
    critic_lr: float = 2e-4
    generator_lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    critic_ratio: int = 3  # critic updates per generator update
    ema: float = 0.95
    dmd_shift: float = 5.0
    t_min: int = 20  # DMD (and critic) timesteps: U[0, 1] shifted by dmd_shift, clamped to
    t_max: int = 980  # [t_min, t_max] / diffusion.num_timesteps
    cfg_stage1: float = 3.0  # classifier-free guidance of the real score (the teacher)
    cfg_stage2: float = 5.0
    short_chunks: int = 4  # stage 1 rollout (teacher-length); also the DMD window of stage 2
    long_chunks_start: int = 8  # stage 2 curriculum: the rollout length is drawn from
    long_chunks_end: int = 12  # [start, max], max growing linearly from start to end over stage2_steps
    # how teacher and critic read the student's history: policy (all of it through the run's memory
    # policy, as the paper says) | window (the last teacher.context_frames only, as the released code)
    teacher_history: str = "policy"
    stage2: bool = True
    stage1_max_minutes: float | None = None  # wall-clock caps of each stage's training (stop cleanly,
    stage2_max_minutes: float | None = None  # checkpoint kept; the curriculum then ends early)


@dataclass
class BenchConfig:
    seconds: float = 60.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    segment_s: float = 10.0  # first-frame consistency segments (paper: 10 s)
    backbone: str = "imagenet"  # pixels | imagenet | dino | dinov2 | clip | random (tests only)
    # VBench scores subject consistency with DINO and background consistency with CLIP; this is the
    # second one (None: the same as `backbone`; with dino + clip weights: backbone=dino, this=clip)
    background_backbone: str | None = None
    weights: str | None = None  # local weight file or cache dir for dino/dinov2/clip/lpips
    # gelu | quick_gelu, for a CLIP state dict that comes without a config (see docs/weights.md)
    clip_activation: str | None = None
    lpips: bool = True
    clip_s: float = 2.0  # VBench-Long clip length: consistency is the mean of per-clip scores
    realism_backbone: str = "imagenet"  # features of the realism Fréchet distance (dino / clip with weights)
    realism_clips: int = 16  # real clips of the world (other seeds) in the benchmark's realism reference
    flow: str = "lk"  # dynamic degree's optical flow: lk (built in) | raft_small | raft_large
    flow_weights: str | None = None  # RAFT weights (a torchvision .pth / .safetensors file or its folder)
    # The benchmark's camera: `tour` leaves each end of the panorama and comes back much later, so revisit
    # lags reach `long_lag_s` (pingpong, the training path, never returns later than 2 panorama widths).
    # `tour_anchored` starts at the other end, so its longest lags return to places the clean context
    # frames never showed (an attention sink cannot serve them; `tour` returns to the first frames' place)
    camera_path: str = "tour_anchored"
    long_lag_s: float = 40.0  # the longest revisit lag the tour schedules (seconds)
    # more backbones whose first-frame consistency Table 1 also reports (bench.backbone always comes first)
    table_backbones: list[str] = field(default_factory=list)
    # `cf bench consistency` benchmarks every method x policy (generators from runs/<preset>/...);
    # the policy "own" stands for each method's own (sliding for self_forcing, sink for longlive, ...)
    # memory.* overrides for the benchmark's generation only: a method trained with one policy and read at
    # inference through another (infinite_rope: Self-Forcing's generator through a global sink). Empty: the
    # generator is read as it was trained
    memory: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["context_forcing"])
    policies: list[str] = field(default_factory=lambda: ["slowfast"])


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project
    experiment: str = "cf"
    ablation: str = ""
    run_name: str | None = None


@dataclass
class Config:
    preset: str = "tiny"
    method: str = "context_forcing"
    seed: int = 0
    out: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    erft: ErftConfig = field(default_factory=ErftConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    cdmd: CdmdConfig = field(default_factory=CdmdConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
