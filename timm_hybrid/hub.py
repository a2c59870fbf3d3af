""" Weights as Hugging Face Hub repos: export a timm training checkpoint, push the folder, write its model card.

Nothing here downloads, uploads or trains on its own. A checkpoint is read with timm's `load_state_dict`
(`state_dict` / `state_dict_ema` / plain dict, `module.` prefixes, `torch.load(weights_only=True)` or safetensors),
the folder is written by timm's `save_for_hf` (config.json + model.safetensors) and uploaded with huggingface_hub.
Loading it back is timm's business:

    timm.create_model('hf-hub:timm-hybrid/cnt_nano_patch7_28.fmnist', pretrained=True)  # hub (or its local cache)
    timm.create_model('cnt_nano_patch7_28.fmnist', pretrained=True)   # the cfg's file: the copy in the package
    timm.create_model('local-dir:path/to/cnt_nano_patch7_28.fmnist', pretrained=True)  # an exported folder

The model card is huggingface_hub's `ModelCard` with `ModelCardData` (the Hub's metadata: library, pipeline, license,
datasets, base model, eval results as its model-index), rendered with `model_cards/template.md` (Jinja).
"""
import copy
import ctypes
import dataclasses
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, get_token

import timm
from timm.models import get_model_input_config, load_state_dict, save_for_hf

from .data import FASHION_MNIST_DATASET
from .flops import count_flops
from .models import official_weights_cache_file, summarize_keys
from .models.baselines import PACKAGED_WEIGHTS_DIR

__all__ = [
    'ExportError', 'HubTokenMissing', 'PublishResult', 'PushError', 'card_accuracy', 'export', 'publish',
    'publish_sources', 'push', 'read_checkpoint', 'render_model_card',
]

HUB_ORG = 'timm-hybrid'
# model_cards/ ships inside the package as timm_hybrid.model_cards (pyproject package-dir), so wheels have it too
MODEL_CARD_TEMPLATE = importlib.resources.files('timm_hybrid.model_cards') / 'template.md'
_HUB_FILES = ('config.json', 'model.safetensors', 'README.md')

# Data sets a pretrained tag stands for: (name in the card, Hugging Face dataset id, paper id)
_TAG_DATASETS = {
    'fmnist': FASHION_MNIST_DATASET,
    'in1k': ('ImageNet-1k', 'imagenet-1k', None),  # the id timm's own cards give
}
# Every card cites TNT (whose outer / inner structure CNT keeps) and DeiT (training recipe, distillation token)
_ALWAYS_CITED = ('arXiv:2103.00112', 'arXiv:2012.12877')
CITATIONS = {
    'arXiv:2103.00112': """@inproceedings{han2021transformer,
  title={Transformer in Transformer},
  author={Han, Kai and Xiao, An and Wu, Enhua and Guo, Jianyuan and Xu, Chunjing and Wang, Yunhe},
  booktitle={Advances in Neural Information Processing Systems},
  year={2021},
  eprint={2103.00112},
  archivePrefix={arXiv}
}""",
    'arXiv:2012.12877': """@inproceedings{touvron2021training,
  title={Training data-efficient image transformers \\& distillation through attention},
  author={Touvron, Hugo and Cord, Matthieu and Douze, Matthijs and Massa, Francisco and Sablayrolles, Alexandre
          and J{\\'e}gou, Herv{\\'e}},
  booktitle={International Conference on Machine Learning},
  pages={10347--10357},
  year={2021},
  eprint={2012.12877},
  archivePrefix={arXiv}
}""",
    'arXiv:1708.07747': """@article{xiao2017fashion,
  title={Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author={Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal={arXiv preprint arXiv:1708.07747},
  year={2017}
}""",
    'timm': """@misc{rw2019timm,
  author={Ross Wightman},
  title={PyTorch Image Models},
  year={2019},
  publisher={GitHub},
  journal={GitHub repository},
  doi={10.5281/zenodo.4414861},
  howpublished={\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
}


class ExportError(ValueError):
    """ A checkpoint that cannot be read, or whose tensors do not fit the model it is exported as. """


class HubTokenMissing(RuntimeError):
    """ No Hugging Face token (argument, HF_TOKEN or `hf auth login`) to push with. """


class PushError(RuntimeError):
    """ A push that could not start (bad repo id, hub unreachable) or finish; it leaves no empty repo behind. """


def read_checkpoint(checkpoint: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """ The model state dict of a timm training checkpoint (.pth / .pth.tar / .bin / .safetensors).

    Args:
        checkpoint: File written by timm's train.py (or any state dict file).
        use_ema: Take `state_dict_ema` when the checkpoint has one (timm's `--model-ema`), else `state_dict`.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f'Checkpoint {path} does not exist (or is not a file).')
    try:
        state_dict = load_state_dict(str(path), use_ema=use_ema, weights_only=True)
    except Exception as e:
        raise ExportError(
            f'Could not read checkpoint {path} ({path.stat().st_size} bytes): {type(e).__name__}: {e}\n'
            f'The file is truncated or corrupted, or is not a PyTorch / safetensors checkpoint; copy it again, or '
            f'export another one (timm keeps last.pth.tar next to model_best.pth.tar).') from e
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ExportError(f'Checkpoint {path} holds no tensors (keys: {sorted(state_dict)[:8]}).')
    return tensors


def _names(keys: Sequence[str], most: int = 16) -> str:
    folded = summarize_keys(list(keys))  # 'blocks.*.x (x12)' instead of twelve lines
    return ', '.join(folded[:most]) + (f', ... ({len(folded) - most} more)' if len(folded) > most else '')


def _load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """ `load_state_dict(strict=True)`, failing with every missing / unexpected / mis-shaped key named at once. """
    model_state = model.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k not in model_state or v.shape == model_state[k].shape}
    mismatched = [
        f'{k} {tuple(v.shape)} (model {tuple(model_state[k].shape)})'
        for k, v in state_dict.items() if k not in fitting]
    try:
        # the model's own load hooks fill what they own (e.g. a token_grid older checkpoints lack) or refuse it
        result = model.load_state_dict(fitting, strict=False)
    except RuntimeError as e:
        raise ExportError(f'{source} does not fit {model.pretrained_cfg["architecture"]}: {e}') from e
    missing = [k for k in result.missing_keys if k not in state_dict]  # mis-shaped keys are listed as such
    unexpected = list(result.unexpected_keys)
    if missing or unexpected or mismatched:
        lines = [f'{source} does not fit {model.pretrained_cfg["architecture"]}:']
        if missing:
            lines.append(f'  missing keys: {_names(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys: {_names(unexpected)}')
        if mismatched:
            lines.append(f'  shape mismatch: {_names(mismatched)}')
        lines.append('Export it as the model it was trained as: same model name and the same num_classes / in_chans / '
                     'model_args (e.g. img_size) that were passed to train.py.')
        raise ExportError('\n'.join(lines))


def _check_output(output_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """ Refuses, before anything is read or written, an output that export may not replace. """
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f'Output {output_dir} is a file, not a folder; give a folder to write (by convention '
                          f'<arch>.<tag>).')
    contents = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if contents and not overwrite:
        raise ExportError(f'Output folder {output_dir} is not empty ({", ".join(contents[:5])}); pass overwrite=True '
                          f'(--overwrite) to replace it as a whole, or give another folder.')
    own_weights = (output_dir / 'model.safetensors').resolve()  # a re-export of the folder's own weights
    if output_dir.resolve() in checkpoint.resolve().parents and checkpoint.resolve() != own_weights:
        raise ExportError(f'Checkpoint {checkpoint} lies inside the output folder {output_dir}, which export replaces '
                          f'as a whole; move it out first, or export to another folder.')


def _check_card_data(card_data: Mapping[str, Any]) -> None:
    """ What the card is rendered from, checked before the export starts (a bad entry would fail after it). """
    for metric, value in (card_data.get('accuracy') or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise ExportError(f'accuracy {metric}={value!r} is not a percentage: give a number in [0, 100], e.g. '
                              f'top1=88.1.')
    unknown = [m for m in card_data.get('compare', ()) if isinstance(m, str) and not timm.is_model(m)]
    if unknown:
        raise ExportError(f'compare: unknown model name(s) {", ".join(unknown)} (timm.list_models() lists them).')


def _check_data_config(data_config: Mapping[str, Any], model: torch.nn.Module) -> None:
    """ The training-time data settings written into config.json: sizes and std positive, crop_pct > 0, as many
    mean / std values as channels (or one), and a fixed-size model's own input size. """
    input_size = data_config.get('input_size')
    model_input = get_model_input_config(model)
    if input_size is not None:
        if len(input_size) != 3 or any(not isinstance(v, int) or v < 1 for v in input_size):
            raise ExportError(f'input_size {tuple(input_size)} must be three integers C H W, each >= 1.')
        if input_size[0] != model_input['input_size'][0]:
            raise ExportError(f'input_size {tuple(input_size)} has {input_size[0]} channels, the model '
                              f'{model_input["input_size"][0]} (in_chans).')
        if model_input['fixed_input_size'] and tuple(input_size) != tuple(model_input['input_size']):
            raise ExportError(
                f'input_size {tuple(input_size)} is not the size the model was built for '
                f'({tuple(model_input["input_size"])}); export it with model_args img_size=({input_size[1]}, '
                f'{input_size[2]}) (--model-kwargs) if it was trained at that size.')
    channels = (input_size or model_input['input_size'])[0]
    for key in ('mean', 'std'):
        values = data_config.get(key)
        if values is not None and len(values) not in (1, channels):
            raise ExportError(f'{key} has {len(values)} values; give 1 or {channels} (one per channel).')
    if any(v <= 0 for v in data_config.get('std') or ()):
        raise ExportError(f'std {tuple(data_config["std"])} must be > 0 (inputs are divided by it).')
    crop_pct = data_config.get('crop_pct')
    if crop_pct is not None and not crop_pct > 0:
        raise ExportError(f'crop_pct {crop_pct} must be > 0 (the fraction of the resized image kept).')


def _checkpoint_dtype(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype:
    """ The dtype the weights are written in: the checkpoint's, when all its floating-point tensors share one (fp16
    stays fp16); float32 when they mix (e.g. fp16 weights with fp32 BatchNorm statistics), which holds each exactly. """
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _swap_into_place(staging: Path, output_dir: Path) -> None:
    """ Puts the complete folder `staging` at `output_dir` in one rename; the previous folder, if any, ends up at
    `staging` (for the caller to delete). Linux's renameat2(RENAME_EXCHANGE) swaps two folders atomically, so a kill
    at any moment leaves one of the two complete folders at `output_dir`; elsewhere an empty (or absent) target is
    replaced atomically by rename and a non-empty one by two renames (a window of two system calls). """
    if not output_dir.exists():
        os.rename(staging, output_dir)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rename_exchange = 2  # linux/fs.h RENAME_EXCHANGE
        at_fdcwd = -100
        if libc.renameat2(at_fdcwd, os.fsencode(staging), at_fdcwd, os.fsencode(output_dir), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass  # no renameat2 (not Linux / old glibc): two renames
    previous = staging.with_name(staging.name + '-previous')
    os.rename(output_dir, previous)
    os.rename(staging, output_dir)
    os.rename(previous, staging)


def _remove_stale_staging(output_dir: Path) -> None:
    """ Deletes what a killed export left beside `output_dir` (its hidden `.<name>.partial-<pid>-*` folder), once
    that process is gone. """
    for stale in output_dir.parent.glob(f'.{output_dir.name}.partial-*'):
        try:
            pid = int(stale.name[len(f'.{output_dir.name}.partial-'):].split('-')[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _same_logits(model: torch.nn.Module, exported: torch.nn.Module) -> bool:
    """ The model and its re-loaded folder give identical logits on one random batch at the model's input size. """
    x = torch.randn((2, *get_model_input_config(model)['input_size']), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(model(x), exported(x), rtol=0, atol=0, equal_nan=True)  # bit-equal, NaN included


def export(
        model_name: str,
        checkpoint: Union[str, os.PathLike],
        output_dir: Union[str, os.PathLike],
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        model_args: Optional[Dict[str, Any]] = None,
        card_data: Optional[Dict[str, Any]] = None,
        use_ema: bool = False,
        data_config: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
) -> Path:
    """ Writes a hub-ready folder (config.json, model.safetensors, README.md) for a trained checkpoint.

    The folder is written beside `output_dir` under a hidden name and renamed into place only when the weights,
    config and card are written and the folder re-loads (`local-dir:`) with logits equal to the checkpoint's: an
    error, or a kill at any moment, leaves `output_dir` as it was. The weights keep the checkpoint's dtype (see
    `_checkpoint_dtype`).

    Args:
        model_name: timm model name the checkpoint was trained as, optionally with its tag
            ('cnt_nano_patch7_28.fmnist'); the tag's pretrained cfg (mean / std, labels, license, papers) goes into
            config.json.
        checkpoint: timm training checkpoint or state dict file. It may be `output_dir`'s own model.safetensors (a
            re-export, e.g. with a new card); no other file inside `output_dir`, which is replaced as a whole.
        output_dir: Folder to write; by convention `<arch>.<tag>`, which is also the default hub repo name.
        num_classes: Classes of the trained head, if not the cfg's.
        in_chans: Input channels of the trained model, if not the cfg's.
        model_args: Further `timm.create_model` kwargs the model was trained with (e.g. img_size, drop_path_rate).
        card_data: Model card data, see `render_model_card`.
        use_ema: Export the EMA weights of the checkpoint (timm's `--model-ema`).
        data_config: The data settings the model was trained with, if not its cfg's (timm's `input_size`, `mean`,
            `std`, `crop_pct`, `interpolation`): written into config.json, so `timm.data.resolve_data_config` gives
            users the training-time preprocessing. With `in_chans` alone, the cfg's input size and mean / std are
            reduced to that many channels (mean of the cfg's values, as timm's data config does).
        overwrite: Replace a non-empty `output_dir` (without it, that is an ExportError).

    Returns:
        The output folder.
    """
    output_dir, checkpoint = Path(output_dir), Path(checkpoint)
    card_data, data_config = dict(card_data or {}), dict(data_config or {})
    _check_output(output_dir, checkpoint, overwrite)
    _check_card_data(card_data)
    state_dict = read_checkpoint(checkpoint, use_ema=use_ema)
    kwargs = dict(model_args or {})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:  # unknown name or tag, a kwarg it does not take or allow
        raise ExportError(f'Cannot build {model_name} with {kwargs or "its defaults"}: {e}') from e
    _load_strict(model, state_dict, f'Checkpoint {checkpoint}')
    model.eval()
    _check_data_config(data_config, model)

    model_config = {}
    label_names = model.pretrained_cfg.get('label_names')
    if label_names and len(label_names) == model.num_classes:
        model_config['label_names'] = list(label_names)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(output_dir)
        staging = Path(tempfile.mkdtemp(prefix=f'.{output_dir.name}.partial-{os.getpid()}-', dir=output_dir.parent))
    except OSError as e:
        raise ExportError(f'Cannot write beside {output_dir}: {e}') from e
    try:
        reference = copy.deepcopy(model)  # float32 with the checkpoint's values: what the folder must give
        # timm writes the model's current input (channels, img_size) and `data_config` over the source cfg, reducing
        # a cfg's per-channel mean / std to the model's channels as its loaders do
        save_for_hf(model.to(_checkpoint_dtype(state_dict)), staging, model_config=model_config, model_args=kwargs,
                    data_config=data_config or None, safe_serialization=True)
        # the card describes what users get: the folder as timm loads it back (its cfg, its input size, its depth)
        exported = timm.create_model(f'local-dir:{staging}', pretrained=True).eval()
        if not _same_logits(reference, exported):
            raise ExportError(f'{staging} does not re-load with the logits of {checkpoint}; nothing was exported.')
        try:
            card = render_model_card(exported, card_data)
        except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as e:
            raise ExportError(f'Cannot render the model card: {type(e).__name__}: {e}') from e
        card.save(staging / 'README.md')
        _swap_into_place(staging, output_dir)
    except OSError as e:
        raise ExportError(f'Cannot write {output_dir}: {e}') from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the previous folder after a swap, else the unfinished one
    return output_dir


def push(
        folder: Union[str, os.PathLike],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: str = 'Add model',
        revision: Optional[str] = None,
):
    """ Uploads an exported folder to the hub repo `repo_id` (created if needed) with huggingface_hub.

    The hub and the token are checked (`whoami`, `repo_exists`) before a repo is created; a repo created here is
    deleted again when the upload fails, so a failed push leaves no empty repo. Failures are a PushError (one line).

    timm's `push_to_hf_hub` re-serialises a model object and writes timm's generic card; an exported folder already
    holds the weights, config and our card, so this is its upload half: `HfApi.create_repo` + `upload_folder`, as the
    `timm` library (hub download statistics).

    Args:
        folder: Folder written by `export`.
        repo_id: 'org/name', e.g. 'timm-hybrid/cnt_nano_patch7_28.fmnist'.
        token: Hugging Face token; by default HF_TOKEN or the cached `hf auth login` token.
        private: Create the repo private.

    Returns:
        huggingface_hub's CommitInfo of the upload.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    absent = [name for name in _HUB_FILES if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f'{folder} is not an exported model folder (no {", ".join(absent)}); write one with '
            f'`timm-hybrid export MODEL --checkpoint PATH --output {folder}`.')
    token = token or get_token()
    if not token:
        raise HubTokenMissing(
            f'No Hugging Face token to push {folder} to {repo_id}: set HF_TOKEN, run `hf auth login`, or pass a '
            f'token (--token). Nothing was uploaded; the folder loads offline as-is with '
            f"timm.create_model('local-dir:{folder}', pretrained=True).")
    try:
        validate_repo_id(repo_id)
        if repo_id.count('/') != 1:
            raise ValueError('expected ORG/NAME')
    except ValueError as e:
        raise PushError(f'repo id {repo_id!r} is not ORG/NAME (e.g. {HUB_ORG}/{folder.name}): {e}') from e
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    check = f'check the network (HF_ENDPOINT, proxies) and that the token may write to {repo_id.split("/")[0]}'
    try:
        # reachability and the token first: nothing is created on the hub before both are known to work
        api.whoami()
        existed = api.repo_exists(repo_id)
    except Exception as e:  # connection, HTTP and offline-mode errors alike: the hub was not usable
        raise PushError(f'cannot reach the Hugging Face Hub to push {folder} to {repo_id} '
                        f'({type(e).__name__}: {e}); {check}. Nothing was uploaded.') from e
    created = False
    try:
        if not existed:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            created = True
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)
    except Exception as e:
        left = ''
        if created:  # no empty repo left behind
            try:
                api.delete_repo(repo_id)
                left = ' The repo created for it was deleted again.'
            except Exception as delete_error:
                left = (f' Deleting the empty repo created for it failed too ({delete_error}): delete {repo_id} '
                        f'on the hub.')
        raise PushError(f'upload of {folder} to {repo_id} failed ({type(e).__name__}: {e}); {check}.{left}') from e


# --- model card ------------------------------------------------------------------------------------------------------

# hub metric names of the accuracies a card reports (model-index), and back
_METRIC_NAMES = {'top1': 'top-1 accuracy', 'top5': 'top-5 accuracy'}


def _paper_ids(pretrained_cfg: Mapping[str, Any]) -> List[str]:
    ids = pretrained_cfg.get('paper_ids') or ()
    return [ids] if isinstance(ids, str) else list(ids)


def _arxiv_url(paper_id: str) -> str:
    return f'https://arxiv.org/abs/{paper_id.split(":")[-1]}'


def _size_text(input_size: Sequence[int]) -> str:
    c, h, w = input_size
    return f'{h} x {w}, {c} channel{"s" if c > 1 else ""}'


def _comparison_row(name: str, model_or_name: Union[str, torch.nn.Module], accuracy: Mapping[str, Any]):
    flops = count_flops(model_or_name)  # at the model's own input size: img_size=56 counts 56 px, not its cfg's 28
    return dict(model=name, top1=accuracy.get('top1'), top5=accuracy.get('top5'), params=flops.mparams,
                gmacs=flops.gmacs, input_size=flops.input_size)


def _formatted(row: Mapping[str, Any]) -> Dict[str, str]:
    """ A comparison table row as the card prints it (blank where a value was not measured). """
    def number(key, fmt):
        return '' if row.get(key) is None else format(row[key], fmt)
    return dict(model=row['model'], top1=number('top1', '.2f'), top5=number('top5', '.2f'),
                params=number('params', '.3f'), gmacs=number('gmacs', '.4f'),
                image_size=_size_text(row['input_size']) if row.get('input_size') else '')


def _output_shapes(model: torch.nn.Module, input_size: Sequence[int]) -> Dict[str, str]:
    """ Shapes quoted in the usage snippets, measured on one zero image. """
    x = torch.zeros(1, *input_size)
    with torch.no_grad():
        unpooled = tuple(model.forward_features(x).shape)
        try:
            # as many as features_only gives by default: the last 3, or fewer in a shallower model (depth=2)
            indices = min(3, len(getattr(model, 'feature_info', None) or [None] * 3))
            features = [tuple(f.shape) for f in model.forward_intermediates(
                x, indices=indices, intermediates_only=True)]
        except (AttributeError, TypeError, NotImplementedError):
            features = []
    return dict(
        unpooled_shape=str(unpooled),
        feature_shape=', '.join(f'torch.Size({list(s)})' for s in features) or 'torch.Size([1, C, H, W])')


def card_accuracy(card: Union[ModelCard, str, os.PathLike]) -> Dict[str, float]:
    """ The accuracies (%) a card reports in its metadata (the Hub's model-index), e.g. {'top1': 86.5, 'top5': 99.6}.

    Args:
        card: A `huggingface_hub.ModelCard` or the path of a README.md.
    """
    if not isinstance(card, ModelCard):
        card = ModelCard.load(Path(card))
    names = {v: k for k, v in _METRIC_NAMES.items()}
    return {names.get(r.metric_name, r.metric_name): float(r.metric_value) for r in card.data.eval_results or ()}


def render_model_card(
        model: torch.nn.Module,
        card_data: Optional[Mapping[str, Any]] = None,
        template: Union[str, os.PathLike, None] = None,
) -> ModelCard:
    """ The model card (README.md) of a hub repo: `huggingface_hub.ModelCardData` (the Hub's metadata: library,
    pipeline, license, datasets, base model, eval results as its model-index) rendered with the one template.

    Args:
        model: The exported model (params and fvcore GMACs are counted on it, at its own input size).
        card_data: Optional entries:
            model_name: repo name (default `<arch>.<tag>`); repo_id: default `timm-hybrid/<model_name>`;
            description: a paragraph; accuracy: {'top1': .., 'top5': ..} in %, measured on `eval_split`
            (default 'test'); dataset / dataset_id: data set name and Hub id (default from the tag: 'fmnist' ->
            Fashion-MNIST, 'in1k' -> ImageNet-1k); teacher: the Hub repo of a distilled student's teacher (the
            card's `base_model`); train_command: the command that trained the weights; curves: an image file in
            the repo (e.g. 'curves.png') shown under Training, curves_caption its alt text; compare: other timm model
            names (params and GMACs counted) or rows {'model': .., 'top1': .., ...} for the comparison table;
            license.
        template: Jinja template of the card (default `MODEL_CARD_TEMPLATE`).

    Returns:
        The `ModelCard`; `str(card)` is the README.md, `card.save(path)` writes it.
    """
    card_data = dict(card_data or {})
    cfg = model.pretrained_cfg
    architecture = cfg['architecture']
    tag = cfg.get('tag')
    model_name = card_data.get('model_name') or (f'{architecture}.{tag}' if tag else architecture)
    repo_id = card_data.get('repo_id') or f'{HUB_ORG}/{model_name}'
    dataset_name, dataset_id, dataset_paper = _TAG_DATASETS.get(tag, (None, None, None))
    dataset_name = card_data.get('dataset', dataset_name)
    dataset_id = card_data.get('dataset_id', dataset_id)
    accuracy = {k: float(v) for k, v in (card_data.get('accuracy') or {}).items()}
    eval_split = card_data.get('eval_split', 'test')
    license_id = card_data.get('license') or cfg.get('license') or 'apache-2.0'
    teacher = card_data.get('teacher')

    this = _comparison_row(f'**{model_name}** (this model)', model, accuracy)
    rows = [this] + [_comparison_row(other, other, {}) if isinstance(other, str) else dict(other)
                     for other in card_data.get('compare', ())]
    paper_ids = _paper_ids(cfg)
    papers = [f'{cfg["paper_name"]}: {_arxiv_url(paper_ids[0])}'] if paper_ids and cfg.get('paper_name') else []
    papers += [_arxiv_url(p) for p in paper_ids[len(papers):]]
    cited = dict.fromkeys(paper_ids + list(_ALWAYS_CITED) + ([dataset_paper] if dataset_paper else []) + ['timm'])
    label_names = cfg.get('label_names')

    metadata = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm-hybrid'],
        license=license_id,
        datasets=[dataset_id] if dataset_id else None,
        base_model=teacher,
        model_name=model_name if accuracy else None,  # the model-index's name; alone, a stray YAML key
        eval_results=[
            EvalResult(task_type='image-classification', dataset_type=dataset_id or dataset_name or 'unknown',
                       dataset_name=dataset_name or dataset_id or 'unknown', dataset_split=eval_split,
                       metric_type='accuracy', metric_name=_METRIC_NAMES.get(k, k), metric_value=round(v, 2))
            for k, v in accuracy.items()] or None,
    )
    return ModelCard.from_template(
        metadata,
        template_path=str(template or MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        architecture=architecture,
        description=card_data.get('description') or (
            f'A {architecture} image classification model{f" trained on {dataset_name}" if dataset_name else ""}, '
            f'built with timm and the timm-hybrid plugin.'),
        params=this['params'],
        gmacs=this['gmacs'],
        image_size=_size_text(this['input_size']),
        accuracy=accuracy,
        eval_split=eval_split,
        papers=papers,
        dataset_name=dataset_name,
        label_names=label_names if label_names and len(label_names) == model.num_classes else None,
        base_model=teacher,
        license=license_id,
        origin_url=cfg.get('origin_url') or 'https://github.com/huggingface/pytorch-image-models (timm), with '
                                            'timm-hybrid',
        pil_mode='L' if this['input_size'][0] == 1 else 'RGB',
        top_k=min(5, model.num_classes) if model.num_classes else 5,
        train_command=card_data.get('train_command'),
        training_note=card_data.get('training_note') or 'The training command was not recorded.',
        curves=card_data.get('curves'),
        curves_caption=card_data.get('curves_caption') or 'training curves',
        comparison=[_formatted(r) for r in rows],
        citations=[CITATIONS.get(p) or f'{p}: {_arxiv_url(p)}' for p in cited],
        **_output_shapes(model, this['input_size']),
    )


# --- publish ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PublishResult:
    """ One tag of `publish`: where its weights came from, where they go, and what the check found. """
    tag: str
    repo_id: str
    source: Optional[str]  # the packaged folder or the official file; None when not given / found
    origin: str  # 'packaged' or the official release (url / page)
    status: str = 'pending'  # 'checked' (dry run), 'pushed', 'no source', 'mismatch'
    max_abs_diff: Optional[float] = None
    folder: Optional[Path] = None
    note: str = ''

    def describe(self) -> str:
        line = f'{self.status:>9}  {self.tag} -> {self.repo_id}, from {self.source or self.origin}'
        if self.max_abs_diff is not None:
            line += f': re-loaded logits max abs diff {self.max_abs_diff:.2e}'
        return line + (f' ({self.note})' if self.note else '')


def _hybrid_tags() -> List[str]:
    return sorted(name for name in timm.list_models(include_tags=True) if '.' in name and timm.models.model_entrypoint(
        name.split('.')[0]).__module__.startswith('timm_hybrid.'))


def publish_sources(
        sources: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
        tags: Optional[Sequence[str]] = None,
        org: str = HUB_ORG,
) -> List[PublishResult]:
    """ Every tag `publish` handles, with its source: each weight folder in the package (timm_hybrid/weights/), and
    each official release (a tag whose cfg names an `origin_url`) from `sources[tag]`, else from timm's download
    cache of its url (where `pretrained=True` puts it), else none ("source file not given").

    Args:
        sources: {tag: official checkpoint file}, e.g. a Refiner-ViT file downloaded from its drive.
        tags: Only these tags (default: all).
        org: Hub organisation of the repos (`<org>/<tag>`).
    """
    sources = {k: Path(v) for k, v in (sources or {}).items()}
    packaged = {f.name: f for f in sorted(PACKAGED_WEIGHTS_DIR.iterdir()) if (f / 'model.safetensors').is_file()}
    known = set(packaged) | {t for t in _hybrid_tags() if timm.get_pretrained_cfg(t).origin_url}
    unknown = sorted(set(tags or ()) - known) + sorted(set(sources) - known)
    if unknown:
        raise ValueError(f'No weights to publish for {", ".join(unknown)}; known tags: {", ".join(sorted(known))}.')
    results = []
    for tag in sorted(known):
        if tags and tag not in tags:
            continue
        repo_id = f'{org}/{tag}'
        if tag in packaged:
            results.append(PublishResult(tag, repo_id, str(packaged[tag]), 'packaged'))
            continue
        cfg = timm.get_pretrained_cfg(tag).to_dict()
        origin = cfg.get('url') or cfg['origin_url']
        cached = official_weights_cache_file(cfg)
        source = sources.get(tag) or (cached if cached is not None and cached.is_file() else None)
        result = PublishResult(tag, repo_id, str(source) if source else None, origin)
        if source is None or not source.is_file():
            result.status = 'no source'
            result.note = (f'source file {source} not found' if source else 'source file not given') + (
                f': download it, then --source {tag}=PATH')
        results.append(result)
    return results


def _check_logits(source: torch.nn.Module, folder: Path, seed: int = 0) -> float:
    """ Max abs difference of the logits of `folder` re-loaded by timm (`local-dir:`) and `source`, on two random
    images of the source's input size. """
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, *source.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, got = source.eval()(x), reloaded(x)
    if got.shape != expected.shape:
        return float('inf')
    return (got - expected).abs().max().item()


def _write_official_folder(result: PublishResult, folder: Path) -> torch.nn.Module:
    """ An official checkpoint converted by the family's checkpoint_filter_fn (timm's pretrained loading of a file),
    written as a hub folder; returns the converted model. """
    model = timm.create_model(result.tag, pretrained=True, pretrained_cfg_overlay=dict(file=result.source)).eval()
    save_for_hf(model, folder, safe_serialization=True)
    cfg = model.pretrained_cfg
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    render_model_card(reloaded, dict(
        description=f'The official {cfg.get("paper_name") or cfg["architecture"]} weights ({result.origin}), '
                    f'converted to timm-hybrid\'s {cfg["architecture"]} by its checkpoint_filter_fn; the logits of '
                    f'this folder were checked against the converted checkpoint before upload.',
        training_note=f'Trained by the authors; see {cfg.get("origin_url") or result.origin}.',
    )).save(folder / 'README.md')
    return model


def publish(
        tags: Optional[Sequence[str]] = None,
        sources: Optional[Mapping[str, Union[str, os.PathLike]]] = None,
        output_dir: Union[str, os.PathLike, None] = None,
        dry_run: bool = False,
        token: Optional[str] = None,
        org: str = HUB_ORG,
        private: bool = False,
        atol: float = 1e-5,
) -> List[PublishResult]:
    """ The maintainer's release step: for every weight folder in the package and every official checkpoint (converted
    through its family's checkpoint_filter_fn), write the hub folder, check that timm re-loads it with the source's
    logits, and push it to `<org>/<tag>` with huggingface_hub (`push`).

    Args:
        tags: Only these tags (default: all, see `publish_sources`).
        sources: {tag: file} of official checkpoints downloaded by hand.
        output_dir: Where the hub folders are written (`<output_dir>/<tag>`); default a temporary folder.
        dry_run: Write and check, push nothing (no network needed).
        token, private: As for `push`.
        atol: Largest logit difference accepted.

    Returns:
        One `PublishResult` per tag; tags without a source are reported ('no source') and skipped.
    """
    results = publish_sources(sources, tags, org)
    if not dry_run and not (token or get_token()):  # before minutes of conversion, not at the first upload
        raise HubTokenMissing('No Hugging Face token to publish with: set HF_TOKEN, run `hf auth login`, or pass a '
                              'token (--token); `timm-hybrid publish --dry-run` checks everything without one.')
    with tempfile.TemporaryDirectory(prefix='timm-hybrid-publish-') as scratch:
        root = Path(output_dir) if output_dir is not None else Path(scratch)
        for result in results:
            if result.status == 'no source':
                continue
            result.folder = root / result.tag
            if result.folder.exists():
                shutil.rmtree(result.folder)
            result.folder.parent.mkdir(parents=True, exist_ok=True)
            if result.origin == 'packaged':  # already a hub folder (written by export); the tag as pip users get it
                shutil.copytree(result.source, result.folder)
                source = timm.create_model(result.tag, pretrained=True)
            else:
                source = _write_official_folder(result, result.folder)
            result.max_abs_diff = _check_logits(source, result.folder)
            if not result.max_abs_diff <= atol:
                result.status, result.note = 'mismatch', f'above {atol:g}: not pushed'
            elif dry_run:
                result.status = 'checked'
            else:
                push(result.folder, result.repo_id, token=token, private=private,
                     commit_message=f'{result.tag} from {result.origin}, re-loaded logits checked')
                result.status = 'pushed'
    return results
