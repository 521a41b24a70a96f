"""Folding one adapter into a plain transformers model (`AdapterModel.merge_adapter`), and making the
merged model's config declare what the merge added, so that ``save_pretrained`` then
``from_pretrained`` gives the same model back."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from flora.methods.base import Bank
from flora.model.layer import ADAPTABLE, AdaptedLayer, weight_out_in


def merged_copy(base_model: PreTrainedModel, adapter_name: str, what: str) -> PreTrainedModel:
    """A copy of ``base_model`` (whose adapted layers hold ``adapter_name``) with that adapter folded into
    its weights and every adapted layer back to its base layer; ``what`` names the adapter in errors."""
    merged = copy.deepcopy(base_model)
    tied = _tied_parameter_ids(merged)
    with torch.no_grad():
        for module, layer in list(_adapted_layers_of(merged)):
            for bank in layer.banks.values():
                if adapter_name in bank.adapters():
                    _merge_into_layer(merged, layer, bank, adapter_name, tied)
            merged.set_submodule(module, layer.base_layer)
        _declare_merged_parameters(merged, what)
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged


def _adapted_layers_of(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def _merge_into_layer(
    model: PreTrainedModel, layer: AdaptedLayer, bank: Bank, adapter_name: str, tied: set[int]
) -> None:
    """Fold ``adapter_name`` of ``bank`` into ``layer.base_layer`` in place (a bias-less layer first
    gets a zero bias if the method adds to it). A weight tied to another parameter (an output layer
    sharing the input embeddings) is untied first, in the module and in ``model.config``
    (``tie_word_embeddings = False``): the merge changes the output layer only."""
    base = layer.base_layer
    if bank.merge_adds_bias and base.bias is None:
        base.bias = nn.Parameter(base.weight.new_zeros(layer.out_features))
    if id(base.weight) in tied:
        base.weight = nn.Parameter(base.weight.detach().clone())
        model.config.tie_word_embeddings = False
    bank.merge_into(adapter_name, weight_out_in(base), base.bias)


def _declare_merged_parameters(merged: PreTrainedModel, what: str) -> None:
    """Make ``merged.config`` declare the parameters the merge added, so that ``from_pretrained`` of
    ``merged.save_pretrained(...)`` rebuilds them: turn on the config's boolean ``*bias*`` options
    that create them; the other layers those options cover get zero biases (the identity). A
    ValueError, naming the layers, where no option creates them or where a reload would tie tensors
    that the merge made different."""
    model_class = type(merged)
    shapes, ties = _parameter_layout(merged)
    expected, expected_ties = _layout_from_config(model_class, merged.config)
    added = shapes.keys() - expected.keys()
    options = {}
    if added:
        options = {
            k: created for k, created in _bias_options(model_class, merged.config, expected).items() if created & added
        }
        for option in options:
            setattr(merged.config, option, True)
        expected, expected_ties = _layout_from_config(model_class, merged.config)
    undeclared = shapes.keys() - expected.keys()
    if undeclared:
        with_bias = [n.removesuffix(".bias") for n in expected if n.endswith(".bias")]
        with_bias = [n for n in with_bias if isinstance(merged.get_submodule(n), ADAPTABLE)]
        raise ValueError(
            f"cannot merge {what} into {model_class.__name__}: the merge adds biases to "
            f"{_layer_patterns(undeclared)}, which {type(merged.config).__name__} has no option to declare, so "
            f"save_pretrained + from_pretrained would drop them (expected target_modules with a bias of their own: "
            f"{_layer_patterns(with_bias) or 'none'}; or run the adapter unmerged with adapter_names=[...])"
        )
    for name in sorted(set().union(*options.values()) - shapes.keys()):
        module_name, _, param = name.rpartition(".")
        module = merged.get_submodule(module_name)
        setattr(module, param, nn.Parameter(module.weight.new_zeros(expected[name])))
    retied = [group for group in expected_ties if group not in ties]
    if retied:
        raise ValueError(
            f"cannot merge {what} into {model_class.__name__}: the merge makes {_layer_patterns(retied[0])} "
            f"different, but the config ties them, so save_pretrained + from_pretrained would make them equal again"
        )


def _parameter_layout(model: nn.Module) -> tuple[dict[str, torch.Size], set[frozenset[str]]]:
    """``({parameter name: shape}, {the names of each tensor shared under several names})``."""
    names_of: dict[int, list[str]] = {}
    shapes = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        shapes[name] = parameter.shape
        names_of.setdefault(id(parameter), []).append(name)
    return shapes, {frozenset(names) for names in names_of.values() if len(names) > 1}


def _layout_from_config(
    model_class: type[PreTrainedModel], config
) -> tuple[dict[str, torch.Size], set[frozenset[str]]]:
    """The `_parameter_layout` of the model that ``from_pretrained`` builds from ``config`` (on the meta device)."""
    with torch.device("meta"):
        return _parameter_layout(model_class(copy.deepcopy(config)))


def _bias_options(model_class: type[PreTrainedModel], config, expected: dict[str, torch.Size]) -> dict[str, set[str]]:
    """``config``'s boolean options named ``*bias*`` that are off and, turned on, only add ``.bias``
    parameters to the ``expected`` layout: ``{option: the parameter names it adds}``."""
    options = {}
    for option, value in config.to_dict().items():
        if "bias" not in option or value is not False:
            continue
        trial = copy.deepcopy(config)
        setattr(trial, option, True)
        names = _layout_from_config(model_class, trial)[0].keys()
        created = names - expected.keys()
        if created and expected.keys() <= names and all(n.endswith(".bias") for n in created):
            options[option] = created
    return options


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """The ids of parameters that ``model`` holds under more than one name (tied weights)."""
    _, ties = _parameter_layout(model)
    return {id(model.get_parameter(name)) for names in ties for name in names}


def _layer_patterns(names) -> str:
    """``"model.layers.*.mlp.up_proj, ..."``: module names with the layer numbers folded, parameter suffixes dropped."""
    return ", ".join(
        sorted({re.sub(r"\.\d+\.", ".*.", n.removesuffix(".bias").removesuffix(".weight")) for n in names})
    )
