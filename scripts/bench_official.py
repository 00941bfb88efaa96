#!/usr/bin/env python
"""Benchmark of the OFFICIAL PyTorch RDT code on CPU: the baselines of BENCHMARKS.md.

Needs a checkout of thu-ml/RoboticsDiffusionTransformer (its ``models/`` package) named by
``RDT_OFFICIAL_DIR``, and a separate venv with torch 2.13.0, timm 1.0.3, diffusers 0.27.2 (the
official code is not part of this repository and is never imported by it). One case per process;
run one at a time on an otherwise idle machine.

  bench_official.py --case pa     --model 170m|1b --dtype fp32|bf16 [--runs 5 --warmup 1]
  bench_official.py --case train  --model 170m|1b --dtype fp32|bf16autocast --batch 2
  bench_official.py --case matmul --dtype fp32|bf16

Appends one JSON line to --out (default official_results.jsonl).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

if not os.environ.get("RDT_OFFICIAL_DIR"):
    sys.exit("set RDT_OFFICIAL_DIR to a checkout of thu-ml/RoboticsDiffusionTransformer")
sys.path.insert(0, os.environ["RDT_OFFICIAL_DIR"])

T_START = time.time()
LOAD_START = open('/proc/loadavg').read().split()[:3]

import torch  # noqa: E402

GiB = 1024 ** 3


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cur_rss_bytes():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
    return -1


def reset_peak_rss():
    # Linux >= 4.0: resets VmHWM (and therefore ru_maxrss of this process).
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


# Hugging Face config.json of robotics-diffusion-transformer/rdt-1b and rdt-170m
# (identical except for the `rdt` block); see /work/shared/fixtures/rdt_keys_*.json.
def hf_config(model):
    rdt = {'170m': {'hidden_size': 1024, 'depth': 14, 'num_heads': 32},
           '1b': {'hidden_size': 2048, 'depth': 28, 'num_heads': 32}}[model]
    return {
        'action_dim': 128,
        'ema': {'update_after_step': 0, 'inv_gamma': 1.0, 'power': 0.75,
                'min_value': 0.0, 'max_value': 0.9999},
        'img_adaptor': 'mlp2x_gelu',
        'img_cond_len': 4374,
        'img_pos_embed_config': [['image', [2, 3, -729]]],
        'img_token_dim': 1152,
        'lang_adaptor': 'mlp2x_gelu',
        'lang_pos_embed_config': [['lang', -1024]],
        'lang_token_dim': 4096,
        'max_lang_cond_len': 1024,
        'noise_scheduler': {'type': 'ddpm', 'num_train_timesteps': 1000,
                            'num_inference_timesteps': 5,
                            'beta_schedule': 'squaredcos_cap_v2',
                            'prediction_type': 'sample', 'clip_sample': False},
        'pred_horizon': 64,
        'rdt': dict(rdt, cond_pos_embed_type='multimodal'),
        'state_adaptor': 'mlp3x_gelu',
        'state_token_dim': 128,
    }


def build_runner(model, dtype):
    from models.rdt_runner import RDTRunner
    cfg = hf_config(model)
    # Same call shape as the hub mixin's from_pretrained(config.json) path.
    runner = RDTRunner(
        action_dim=cfg['action_dim'], pred_horizon=cfg['pred_horizon'], config=cfg,
        lang_token_dim=cfg['lang_token_dim'], img_token_dim=cfg['img_token_dim'],
        state_token_dim=cfg['state_token_dim'], max_lang_cond_len=cfg['max_lang_cond_len'],
        img_cond_len=cfg['img_cond_len'], lang_pos_embed_config=cfg['lang_pos_embed_config'],
        img_pos_embed_config=cfg['img_pos_embed_config'], dtype=dtype)
    return runner, cfg


# ALOHA 14 slots of the unified 128-d vector (DEPLOY.md 1.2); content is irrelevant for timing.
ALOHA_SLOTS = [*range(50, 56), 60, *range(0, 6), 10]


def make_inputs(batch, fdtype, lang_len=32, with_action_gt=False):
    g = torch.Generator().manual_seed(0)
    lang_tokens = torch.randn(batch, lang_len, 4096, generator=g).to(fdtype)
    lang_attn_mask = torch.ones(batch, lang_len, dtype=torch.bool)
    img_tokens = torch.randn(batch, 4374, 1152, generator=g).to(fdtype)
    state_tokens = torch.randn(batch, 1, 128, generator=g).to(fdtype)
    action_mask = torch.zeros(batch, 1, 128)
    action_mask[..., ALOHA_SLOTS] = 1.0
    action_mask = action_mask.to(fdtype)
    ctrl_freqs = torch.tensor([25] * batch)
    d = dict(lang_tokens=lang_tokens, lang_attn_mask=lang_attn_mask, img_tokens=img_tokens,
             state_tokens=state_tokens, action_mask=action_mask, ctrl_freqs=ctrl_freqs)
    if with_action_gt:
        d['action_gt'] = torch.randn(batch, 64, 128, generator=g).to(fdtype)
    return d


from bench_turns import Turns  # noqa: E402  (scripts/, next to this file)

CLK = os.sysconf('SC_CLK_TCK')
CONTENTION = []  # per timed run: dict(own_cpu_s, others_cpu_s, wall_s)
TURNS = Turns(False)  # --turns: bench_pair.py decides when each phase runs


def _sys_busy_s():
    f = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return (sum(f[:8]) - idle) / CLK


def _own_cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, warmup, runs):
    ws, ts = [], []
    with TURNS.turn('warmup'):
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            ws.append(time.perf_counter() - t0)
    for _ in range(runs):
        with TURNS.turn('run'):
            b0, c0 = _sys_busy_s(), _own_cpu_s()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            b1, c1 = _sys_busy_s(), _own_cpu_s()
        ts.append(dt)
        # CPU seconds burnt on this VM by anything other than this process during the run
        CONTENTION.append(dict(wall_s=round(dt, 3), own_cpu_s=round(c1 - c0, 2),
                               others_cpu_s=round(max(0.0, (b1 - b0) - (c1 - c0)), 2)))
    return ws, ts


def case_pa(a, rec):
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    # official inference: RDTRunner(..., dtype=bf16) then policy.to(device, dtype=bf16)
    runner, _cfg = build_runner(a.model, dtype)
    runner = runner.to(dtype=dtype)
    runner.eval()
    inp = make_inputs(a.batch, dtype)
    rec['setup_s'] = time.perf_counter() - t0
    rec['n_params'] = sum(p.numel() for p in runner.parameters())
    rec['param_dtypes'] = sorted({str(p.dtype) for p in runner.parameters()})
    rec['rss_after_setup_gib'] = cur_rss_bytes() / GiB
    rec['peak_rss_setup_gib'] = maxrss_bytes() / GiB
    reset_peak_rss()
    torch.manual_seed(0)
    out = {}

    def fn():
        with torch.inference_mode():
            out['a'] = runner.predict_action(**inp)

    ws, ts = timed(fn, a.warmup, a.runs)
    rec['out_shape'] = list(out['a'].shape)
    rec['out_dtype'] = str(out['a'].dtype)
    rec['out_finite'] = bool(torch.isfinite(out['a'].float()).all())
    return ws, ts


def case_train(a, rec):
    # fp32 master weights in both cases (bf16 = torch.autocast on CPU)
    runner, _cfg = build_runner(a.model, torch.float32)
    runner.train()
    inp = make_inputs(a.batch, torch.float32, with_action_gt=True)
    opt = torch.optim.AdamW(runner.parameters(), lr=1e-4, weight_decay=1e-2)
    rec['n_params'] = sum(p.numel() for p in runner.parameters())
    rec['optimizer'] = 'torch.optim.AdamW(lr=1e-4, weight_decay=1e-2) defaults otherwise'
    rec['rss_after_setup_gib'] = cur_rss_bytes() / GiB
    rec['peak_rss_setup_gib'] = maxrss_bytes() / GiB
    reset_peak_rss()
    torch.manual_seed(0)
    losses = []
    args = (inp['lang_tokens'], inp['lang_attn_mask'], inp['img_tokens'], inp['state_tokens'],
            inp['action_gt'], inp['action_mask'], inp['ctrl_freqs'])

    def fn():
        opt.zero_grad(set_to_none=True)
        if a.dtype == 'bf16autocast':
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = runner.compute_loss(*args)
        else:
            loss = runner.compute_loss(*args)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    ws, ts = timed(fn, a.warmup, a.runs)
    rec['losses'] = losses
    return ws, ts


def case_matmul(a, rec):
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[a.dtype]
    n = 4096
    x = torch.randn(n, n).to(dtype)
    y = torch.randn(n, n).to(dtype)
    reset_peak_rss()
    ws, ts = timed(lambda: torch.mm(x, y), a.warmup, a.runs)
    rec['gflops_median'] = 2 * n ** 3 / statistics.median(ts) / 1e9
    rec['gflops_best'] = 2 * n ** 3 / min(ts) / 1e9
    return ws, ts


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--case', required=True, choices=['pa', 'train', 'matmul'])
    p.add_argument('--model', default='170m', choices=['170m', '1b'])
    p.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16', 'bf16autocast'])
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default='official_results.jsonl')
    p.add_argument('--tag', default='')
    p.add_argument('--turns', action='store_true',
                   help='run each phase when bench_pair.py says so (stdin/stdout protocol of bench_turns.py)')
    a = p.parse_args()
    global TURNS
    TURNS = Turns(a.turns)
    torch.set_num_threads(a.threads)

    import timm
    from timm.layers import use_fused_attn
    rec = dict(case=a.case, model=a.model if a.case != 'matmul' else None, dtype=a.dtype,
               batch=a.batch if a.case != 'matmul' else None, warmup=a.warmup, runs=a.runs,
               threads=torch.get_num_threads(), tag=a.tag)
    if a.case != 'matmul':
        import diffusers
        rec['cond'] = dict(lang_tokens=[a.batch, 32, 4096], img_tokens=[a.batch, 4374, 1152],
                           state=[a.batch, 1, 128], action_mask=[a.batch, 1, 128],
                           ctrl_freqs=[a.batch], pred_horizon=64, inference_steps=5,
                           scheduler='DPMSolverMultistep dpmsolver++ (predict) / DDPM (train)')
        rec['timm_fused_attn'] = bool(use_fused_attn())
        rec['diffusers'] = diffusers.__version__
    rec['torch'] = torch.__version__
    rec['timm'] = timm.__version__

    fn = {'pa': case_pa, 'train': case_train, 'matmul': case_matmul}[a.case]
    ws, ts = fn(a, rec)
    rec['warmup_s'] = ws
    rec['times_s'] = ts
    rec['median_s'] = statistics.median(ts)
    rec['min_s'] = min(ts)
    rec['per_run_cpu'] = CONTENTION
    rec['others_cpu_frac_max'] = max(c['others_cpu_s'] / c['wall_s'] for c in CONTENTION)  # in cores
    rec['peak_rss_run_gib'] = maxrss_bytes() / GiB  # warm-up + timed runs (after reset)
    rec['peak_rss_gib'] = max(rec.get('peak_rss_setup_gib', 0.0), rec['peak_rss_run_gib'])
    rec['loadavg_start'] = LOAD_START
    rec['loadavg_end'] = open('/proc/loadavg').read().split()[:3]
    rec['wall_s'] = time.time() - T_START
    rec['host'] = platform.node()
    rec['time'] = time.strftime('%Y-%m-%dT%H:%M:%S')
    line = json.dumps(rec)
    print(line)
    with open(a.out, 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
    main()
