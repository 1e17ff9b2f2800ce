"""`run`: a ComfyUI workflow file (UI or API form, or a ComfyUI PNG) executed on cascade_lab, results per
SaveImage / PreviewImage node; `check`: everything that can be checked before a model loads."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .graph import check as check_graph
from .graph import is_link
from .workflow import Graph, WorkflowError, apply_settings, read_workflow, title

Source = str | os.PathLike[str] | Mapping[str, Any]


class WorkflowOutputs(dict[str, Any]):
    """``{node id: Result}`` for every SaveImage / PreviewImage node, in node order; ``files`` the PNGs written,
    ``images`` each node's IMAGE as ComfyUI holds it ([B, H, W, 3] float32, not clamped)."""

    def __init__(self, *args: Any, files: dict[str, list[Path]] | None = None, graph: Graph | None = None) -> None:
        super().__init__(*args)
        self.files = files or {}
        self.graph = graph or {}
        self.images: dict[str, Any] = {}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        for node_id, result in self.items():
            print(f"node {title(self.graph, node_id)}" if node_id in self.graph else f"node {node_id}")
            display(result)


def models_and_inputs(models: Any, input_dir: Any) -> tuple[Any, Path | None]:
    """The ComfyUI install or models folder (``models``, else ``$CASCADE_LAB_COMFYUI``) and its input folder."""
    from ..weights.comfyui_paths import comfyui_root

    root = comfyui_root(models)
    if input_dir is None and root is not None and (root / "input").is_dir():
        input_dir = root / "input"
    return models, Path(input_dir) if input_dir is not None else None


def check(source: Source, *, models: str | os.PathLike[str] | None = None,
          set: Mapping[str, Any] | None = None, outputs: Mapping[str, Any] | None = None,
          input_dir: str | os.PathLike[str] | None = None, extra_model_paths: Any = None,
          tokenizer: str | os.PathLike[str] | None = None) -> Graph:
    """The workflow's API graph after ``set``, checked as `run` checks it before loading anything; raises
    `WorkflowError` with every problem in one message."""
    graph, _ = read_workflow(source)
    if set:
        graph = apply_settings(graph, set)
    models, inputs = models_and_inputs(models, input_dir)
    order = check_graph(graph, comfyui=models, extra_model_paths=extra_model_paths, input_dir=inputs,
                        given=_given_ids(graph, outputs))
    _check_tokenizers(graph, order, _given_ids(graph, outputs), models, extra_model_paths, tokenizer)
    return graph


def run(source: Source, *, models: str | os.PathLike[str] | None = None, set: Mapping[str, Any] | None = None,
        outputs: Mapping[str, Any] | None = None, input_dir: str | os.PathLike[str] | None = None,
        output_dir: str | os.PathLike[str] | None = None, extra_model_paths: Any = None,
        configs: Mapping[str, Any] | None = None, tokenizer: str | os.PathLike[str] | None = None,
        callback: Callable[[Any], Any] | None = None,
        cancel: Callable[[], bool] | None = None, dtype: str = "float32") -> WorkflowOutputs:
    """Run a ComfyUI workflow (a .json in UI or API form, a ComfyUI PNG, or the loaded dict) on cascade_lab.

    ``models``: the ComfyUI install (or its ``models/``) whose folders and extra_model_paths.yaml name the files
    (default ``$CASCADE_LAB_COMFYUI``); ``input_dir`` where LoadImage files are (default the install's input/).
    ``set``: ``{"3.seed": 5, "6.text": "a fox"}`` changes node inputs first. ``outputs``: node outputs given
    instead of running the node, ``{"6": (cond [1, 77, C], pooled [1, C])}`` for a CLIPTextEncode (no tokenizer
    needed), ``{"49": latent}`` for a StableCascade_StageC_VAEEncode (its stage_c; stage_b follows), or a tuple of
    every output. ``configs``: model configs for sizes a file's header cannot name (``{"stage_c": {...}}``, or
    per file ``{"controlnet:canny.safetensors": {...}}``).
    ``tokenizer``: a CLIP tokenizer folder (default: next to the checkpoint, the Hub cache, ComfyUI's
    ``comfy/sd1_tokenizer``; `cascade_lab.comfyui.tokenizer.write_clip_tokenizer` makes one offline).
    ``dtype``: the Stage C / Stage B compute dtype, "float32" or "bfloat16" (ComfyUI's ``--bf16-unet``).
    ``output_dir``: SaveImage nodes write ``<prefix>_00001_.png`` there as ComfyUI (with the workflow and
    cascade_lab's parameters in the PNG); without it nothing is written. Everything is checked before any model
    loads. Returns ``{node id: Result}`` per SaveImage / PreviewImage node.
    """
    graph, ui = read_workflow(source)
    if set:
        graph = apply_settings(graph, set)
    models, inputs = models_and_inputs(models, input_dir)
    given_ids = _given_ids(graph, outputs)
    order = check_graph(graph, comfyui=models, extra_model_paths=extra_model_paths, input_dir=inputs,
                        given=given_ids)
    _check_tokenizers(graph, order, given_ids, models, extra_model_paths, tokenizer)
    if output_dir is not None:  # a SaveImage prefix leading out of the output folder stops the run here
        for node_id in order:
            if graph[node_id]["class_type"] == "SaveImage":
                _save_folder(Path(output_dir), str(graph[node_id]["inputs"].get("filename_prefix", "ComfyUI")))

    dtypes = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
    if dtype not in dtypes:
        raise WorkflowError(f"dtype={dtype!r}: use 'float32' or 'bfloat16' (ComfyUI's --bf16-unet)")
    import torch

    from .execute import Executor
    from .models import ModelFiles
    from .sampling import generation_params

    given = {node_id: _given_outputs(graph, node_id, value, inputs) for node_id, value in (outputs or {}).items()}
    executor = Executor(graph, order, comfyui=models, extra_model_paths=extra_model_paths, input_dir=inputs,
                        files=ModelFiles(configs, tokenizer, models), given=given, callback=callback, cancel=cancel,
                        dtype=getattr(torch, dtypes[dtype]))
    saved = executor.run()
    results = WorkflowOutputs(graph=graph)
    for node_id, (images, made) in saved.items():
        results[node_id] = _result(images, made, generation_params, _model_file(graph, node_id))
        results.images[node_id] = images
    if output_dir is not None:
        for node_id, result in results.items():
            if graph[node_id]["class_type"] == "SaveImage":
                prefix = str(graph[node_id]["inputs"].get("filename_prefix", "ComfyUI"))
                results.files[node_id] = save_pngs(result, Path(output_dir), prefix, graph, ui,
                                                   images=results.images[node_id])
    return results


def _given_ids(graph: Graph, outputs: Mapping[str, Any] | None) -> dict[str, Any]:
    unknown = [k for k in (outputs or {}) if str(k) not in graph]
    if unknown:
        raise WorkflowError(f"outputs= names node(s) {', '.join(map(str, unknown))} the workflow does not have")
    return {str(k): v for k, v in (outputs or {}).items()}


def _given_outputs(graph: Graph, node_id: str, value: Any, input_dir: Path | None) -> tuple[Any, ...]:
    """A given node output in the executor's types: CONDITIONING from (cond, pooled), LATENT from a tensor."""
    import torch

    from .models import Cond, Latent
    from .nodes import NODES

    kind = graph[node_id]["class_type"]
    spec = NODES.get(kind)
    types = [t for _, t in spec.outputs] if spec else []
    values = value if isinstance(value, tuple) and not (types[:1] == ["CONDITIONING"] and len(value) == 2
                                                         and isinstance(value[0], torch.Tensor)) else (value,)
    out: list[Any] = []
    for i, v in enumerate(values):
        kind_i = types[i] if i < len(types) else ""
        if kind_i == "CONDITIONING" and isinstance(v, tuple):
            cond, pooled = v
            text = graph[node_id]["inputs"].get("text", "")
            out.append([Cond(cond.float(), pooled.float().reshape(1, -1), prompt=text if isinstance(text, str)
                             else "", source=node_id)])
        elif kind_i == "LATENT" and isinstance(v, torch.Tensor):
            info = _latent_info(graph, node_id, v, input_dir)
            out.append(Latent(v.float(), "c" if v.size(1) == 16 else "b", info=info))
        else:
            out.append(v)
    if kind == "StableCascade_StageC_VAEEncode" and len(out) == 1:  # stage_b is zeros at the image's size
        latent = out[0]
        info = latent.info
        out.append(Latent(torch.zeros(latent.samples.size(0), 4, (info["height"] // 8) * 2,
                                      (info["width"] // 8) * 2), "b", info=info))
    return tuple(out)


def _latent_info(graph: Graph, node_id: str, latent: Any, input_dir: Path | None) -> dict[str, Any]:
    """Width, height and compression of a given StageC_VAEEncode latent, from the LoadImage that feeds it."""
    node = graph[node_id]
    compression = int(node["inputs"].get("compression", 42))
    info: dict[str, Any] = {"compression": compression, "batch_size": int(latent.size(0)),
                            "height": int(latent.size(-2)) * compression, "width": int(latent.size(-1)) * compression}
    image = node["inputs"].get("image")
    if is_link(image) and graph.get(str(image[0]), {}).get("class_type") == "LoadImage":
        from PIL import Image

        from .graph import find_input

        path = find_input(str(graph[str(image[0])]["inputs"].get("image")), input_dir)
        if path is not None:
            with Image.open(path) as picture:  # the header only: the size the latent was made from
                info["width"], info["height"] = picture.size
            info["init_image"] = str(path)
    return info


def _check_tokenizers(graph: Graph, order: list[str], given: Mapping[str, Any], models: Any,
                      extra_model_paths: Any, tokenizer: Any = None) -> None:
    """A CLIPTextEncode needs a CLIP tokenizer for its file; checked before anything loads."""
    from ..weights import TokenizerNotFoundError, comfyui_model_path, find_tokenizer
    from .graph import MODEL_FILES

    problems = []
    seen: dict[str, str | None] = {}
    for node_id in order:
        node = graph[node_id]
        clip = node["inputs"].get("clip")
        if node["class_type"] != "CLIPTextEncode" or node_id in given or not is_link(clip):
            continue
        source = _through_loras(graph, str(clip[0]))
        kind = graph[source]["class_type"]
        if kind not in MODEL_FILES:
            continue
        name = graph[source]["inputs"].get(MODEL_FILES[kind][0])
        if name not in seen:
            try:
                path = comfyui_model_path(MODEL_FILES[kind][1], name, comfyui=models,
                                          extra_model_paths=extra_model_paths)
                find_tokenizer(path, tokenizer, comfyui=models)
                seen[name] = None
            except TokenizerNotFoundError as e:
                seen[name] = str(e).splitlines()[0]
        if seen[name]:
            problems.append(f"node {title(graph, node_id)}: {seen[name]}")
    if problems:
        raise WorkflowError("the workflow cannot run; nothing was loaded or written:\n  " + "\n  ".join(problems)
                            + "\n  Fetch the tokenizer (see cascade_lab.weights.find_tokenizer), or give the text "
                              "conditioning: outputs={'<node id>': (cond, pooled)}.")


def _through_loras(graph: Graph, node_id: str) -> str:
    while graph[node_id]["class_type"] == "LoraLoader" and is_link(graph[node_id]["inputs"].get("clip")):
        node_id = str(graph[node_id]["inputs"]["clip"][0])
    return node_id


def _model_file(graph: Graph, node_id: str) -> str | None:
    """The file name of the diffusion model nearest upstream of a node (a checkpoint or UNET loader), if any."""
    from collections import deque

    seen, queue = {node_id}, deque([node_id])
    while queue:
        node = graph[queue.popleft()]
        if node["class_type"] in ("CheckpointLoaderSimple", "unCLIPCheckpointLoader", "UNETLoader"):
            name = node["inputs"].get("unet_name" if node["class_type"] == "UNETLoader" else "ckpt_name")
            return os.path.basename(str(name).replace("\\", "/")) if name else None
        for value in node["inputs"].values():
            if is_link(value) and str(value[0]) in graph and str(value[0]) not in seen:
                seen.add(str(value[0]))
                queue.append(str(value[0]))
    return None


def _result(images: Any, made: dict[str, Any] | None, params_of: Callable[[dict[str, Any]], Any],
            model: str | None = None) -> Any:
    """A cascade_lab `Result` for one output node: with the generation's parameters and latents when the images
    come straight from a Stage C → Stage B → Stage A chain; otherwise the variant names the nearest model file
    upstream (``comfyui:<file>``; plain ``comfyui`` when no model made the images)."""
    from ..params import GenerationParams
    from ..results import Result, to_pil

    pictures = to_pil(images[..., :3].movedim(-1, 1), rounding="truncate")  # SaveImage: uint8 of clip(255·x)
    if made and "latent" in made:
        latent_b = made["latent"]
        return Result(pictures, params_of(made), latent_b.info.get("latent_c"), latent_b.raw)
    params = GenerationParams("", width=images.shape[2], height=images.shape[1], batch_size=images.shape[0],
                              compat="comfyui", variant=f"comfyui:{model}" if model else "comfyui")
    return Result(pictures, params)


def _save_folder(folder: Path, prefix: str) -> Path:
    """The folder a SaveImage prefix writes into (it may name sub-folders, never a place outside ``folder``)."""
    prefix = prefix.replace("\\", "/")
    target = folder / os.path.dirname(prefix) if "/" in prefix else folder
    if not target.resolve().is_relative_to(folder.resolve()):
        raise WorkflowError(f"SaveImage filename_prefix {prefix!r} points outside the output folder {folder}; "
                            "nothing was loaded or written")
    return target


def save_pngs(result: Any, folder: Path, prefix: str, graph: Graph, ui: Mapping[str, Any] | None,
              images: Any = None) -> list[Path]:
    """SaveImage's files: ``<prefix>_<counter:05>_.png`` after the highest counter already there, each carrying
    ComfyUI's ``prompt`` / ``workflow`` chunks and cascade_lab's parameters; RGBA when ``images`` (ComfyUI's IMAGE)
    has an alpha channel. A prefix may name sub-folders, never a place outside ``folder``."""
    from ..results import _png_info

    target = _save_folder(folder, prefix)
    stem = os.path.basename(prefix.replace("\\", "/"))
    target.mkdir(parents=True, exist_ok=True)
    pictures = list(result.images)
    if images is not None and images.shape[-1] == 4:  # JoinImageWithAlpha: saved with its alpha, as ComfyUI
        import torch
        from PIL import Image

        pixels = (images.float() * 255).clamp(0, 255).to(torch.uint8).numpy()  # truncated, as SaveImage
        pictures = [Image.fromarray(p, "RGBA") for p in pixels]
    pattern = re.compile(re.escape(stem) + r"_(\d{5})_\.png$")
    counter = max([int(m.group(1)) for p in target.iterdir() if (m := pattern.match(p.name))], default=0) + 1
    api = {k: {"inputs": v["inputs"], "class_type": v["class_type"], "_meta": v.get("_meta", {})}
           for k, v in graph.items()}
    written = []
    for i, image in enumerate(pictures):
        info = _png_info(result.params, i if len(pictures) > 1 else None, comfyui=False)  # the workflow's own
        info.add_text("prompt", json.dumps(api))
        if ui is not None:
            info.add_text("workflow", json.dumps(ui))
        path = target / f"{stem}_{counter + i:05}_.png"
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG", pnginfo=info, compress_level=4)
        tmp.replace(path)
        written.append(path)
    return written
