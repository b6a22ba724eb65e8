"""The command line: ``python -m lees_jax.convert --source=... --out=...`` (see `lees_jax.convert`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lees_jax.convert import convert, dit_original, guided_diffusion
from lees_jax.convert.diffusers_unet import DDPM_DROPOUT
from lees_jax.convert.sources import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m lees_jax.convert',
      description='Import a diffusers UNet2DModel checkpoint (e.g. google/ddpm-cifar10-32, or an '
                  'ADM-style one), a diffusers DiT (e.g. the transformer/ folder of '
                  'facebook/DiT-XL-2-256), an original DiT checkpoint (DiT-XL-2-256x256.pt, with '
                  '--arch=DiT-XL/2) or an OpenAI guided-/improved-diffusion UNet (e.g. '
                  '64x64_diffusion.pt, with --model_flags) as a lees_jax backbone directory (load '
                  'it with lees_jax.load_backbone).')
  parser.add_argument('--source', required=True,
                      help='Hugging Face Hub id (e.g. google/ddpm-cifar10-32), a local directory '
                           f'holding {CONFIG_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}, an '
                           'original DiT checkpoint file (e.g. DiT-XL-2-256x256.pt, from '
                           f'{dit_original.RELEASE_URL}) or an OpenAI UNet file (e.g. '
                           '64x64_diffusion.pt, with --model_flags)')
  parser.add_argument('--arch', default=None,
                      help='architecture of an original DiT .pt/.pth file (required for one, '
                           'refused otherwise): DiT-<S|B|L|XL>/<2|4|8>, e.g. DiT-XL/2, optionally '
                           'followed by ,hidden_size=N,depth=N,num_heads=N,mlp_ratio=R; or '
                           "'uvit' for an original U-ViT .pth file (with --model_config)")
  parser.add_argument('--model_config', default=None,
                      help='with --arch=uvit: the network of an original U-ViT .pth file, a '
                           'public configuration (celeba64_uvit_small, cifar10_uvit_small, '
                           'imagenet64_uvit_mid, imagenet64_uvit_large) or a JSON object of '
                           "U-ViT's config.nnet fields, e.g. '{\"img_size\": 64, \"patch_size\": "
                           '4, "embed_dim": 512, "depth": 12, "num_heads": 8}\'')
  parser.add_argument('--model_flags', default=None,
                      help='architecture and diffusion of an OpenAI guided-/improved-diffusion '
                           'UNet .pt (required for one, refused otherwise): the flags string of '
                           'its README, given as --model_flags="...", e.g. "--attention_resolutions 32,16,8 '
                           '--class_cond True '
                           '--image_size 64 --learn_sigma True --noise_schedule cosine '
                           '--num_channels 192 --num_head_channels 64 --num_res_blocks 3 '
                           '--resblock_updown True --use_new_attention_order True '
                           '--use_scale_shift_norm True"')
  parser.add_argument('--model_defaults', default=None,
                      choices=sorted(guided_diffusion.DEFAULTS),
                      help='whose model_and_diffusion_defaults --model_flags are read on '
                           '(default guided-diffusion; improved-diffusion for its files)')
  parser.add_argument('--input_size', type=int, default=None,
                      help='latent pixels per side of an original DiT file (default: inferred '
                           'from its pos_embed; checked against it when given)')
  parser.add_argument('--vae', default=None,
                      help='the VAE a latent backbone (DiT) is stored with: a Hub id (e.g. '
                           'stabilityai/sd-vae-ft-mse) or a local AutoencoderKL directory; '
                           "'none' for none (default: the pipeline's own vae/ folder, if any)")
  parser.add_argument('--out', required=True, help='output backbone directory (must not exist)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  parser.add_argument('--dropout', type=float, default=None,
                      help=f'training dropout recorded in the model config (default: the config\'s '
                           f'non-zero dropout, else {DDPM_DROPOUT} as in DDPM CIFAR-10)')
  args = parser.parse_args(argv)
  try:
    directory = convert(args.source, args.out, overwrite=args.overwrite, dropout=args.dropout,
                        arch=args.arch, input_size=args.input_size, vae=args.vae,
                        model_config=args.model_config, model_flags=args.model_flags,
                        model_defaults=args.model_defaults)
  except (ValueError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if not os.path.isfile(os.path.join(directory, 'backbone.json')):  # a VAE on its own
    with open(os.path.join(directory, 'vae.json')) as f:
      m = json.load(f)['model']
    print(f'wrote {directory}: an AutoencoderKL (block_out_channels={tuple(m["block_out_channels"])}'
          f', latent_channels={m["latent_channels"]}, scaling_factor={m["scaling_factor"]}); use '
          f'it with --config.vae.source={directory}')
    return 0
  with open(os.path.join(directory, 'backbone.json')) as f:
    meta = json.load(f)
  m = meta['model']
  if m['name'] == 'uvit':
    print(f'wrote {directory}: {meta["num_params"]:,} parameters, U-ViT '
          f'embed_dim={m["embed_dim"]}, depth={m["depth"]}, num_heads={m["num_heads"]}, '
          f'patch_size={m["patch_size"]}, img_size={m["img_size"]}, '
          f'num_classes={m["num_classes"]}, from {meta["source"]}; '
          f'diffusion: {meta["diffusion"]} (sample it with lees_jax.sde)')
    print(f'load it with: model, params = lees_jax.load_backbone({directory!r})')
    return 0
  if m['name'] == 'adm_unet':
    print(f'wrote {directory}: {meta["num_params"]:,} parameters, ADM '
          f'model_channels={m["model_channels"]}, channel_mult={tuple(m["channel_mult"])}, '
          f'num_res_blocks={m["num_res_blocks"]}, attention at downsample rates '
          f'{tuple(m["attention_resolutions"])}, num_classes={m["num_classes"]}, output '
          f'{meta["model_output"]}, from {meta["source"]} ({meta["source_files"]["weights"]}); '
          f'diffusion: {meta["diffusion"]}')
  elif m['name'] == 'dit':
    print(f'wrote {directory}: {meta["num_params"]:,} parameters, DiT hidden_size={m["hidden_size"]}, '
          f'depth={m["depth"]}, num_heads={m["num_heads"]}, patch_size={m["patch_size"]}, '
          f'input_size={m["input_size"]}, num_classes={m["num_classes"]}, output '
          f'{meta["model_output"]}, from {meta["source"]} ({meta["source_files"]["weights"]}); '
          f'diffusion: {meta["diffusion"]}')
  else:
    print(f'wrote {directory}: {meta["num_params"]:,} parameters, ch={m["ch"]}, '
          f'ch_mult={tuple(m["ch_mult"])}, attn_resolutions={tuple(m["attn_resolutions"])}, '
          f'from {meta["source"]} ({meta["source_files"]["weights"]}, {meta["attention_names"]} '
          f'attention names); diffusion: {meta["diffusion"]}')
  print(f'note: the source samples with variance_type={meta["variance_type"]!r} '
        f'({meta["variance_type_from"]}); lees_jax\'s DDPM sampler uses config.sampler.variance '
        + (("(configs/imagenet256_dit.py: 'learned_range', DiT's)" if m['name'] == 'dit' else
            "(set it to 'learned_range' to sample as the source does)")
           if meta['variance_type'] == 'learned_range' else "(default 'fixed_small')"))
  if m['name'] == 'dit':
    print('note: ' + (f'its VAE is in {os.path.join(directory, "vae")}'
                      if os.path.isdir(os.path.join(directory, 'vae')) else
                      'no VAE stored with it (pass --vae=stabilityai/sd-vae-ft-mse to add one, or '
                      'name one at run time with --config.vae.source)'))
  if meta.get('source_weights') == 'ema':
    print('note: a train.py checkpoint: its EMA weights were imported')
  if meta.get('ignored_config_keys'):
    model_class = 'DiTTransformer2DModel' if m['name'] == 'dit' else 'UNet2DModel'
    print(f'note: config.json keys not used by diffusers\' {model_class} were ignored: '
          f'{meta["ignored_config_keys"]}')
  print(f'load it with: model, params = lees_jax.load_backbone({directory!r})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
