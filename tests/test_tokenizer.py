"""The offline CLIP tokenizer gives open_clip's ids and survives a pipeline save/load."""

import open_clip
import pytest

from diffmem.models.tokenizer import END_TOKEN, VOCAB_SIZE


@pytest.mark.parametrize("text", [
    "a large red circle in the top left on a brown background",
    "The Long Dark Gets First Trailer, Steam Early Access",
    "Hello, World! isn't it 42 café? ümlaut — dash",
])
def test_ids_match_open_clip(clip_tokenizer, text):
    reference = open_clip.tokenizer.SimpleTokenizer()
    expected = [49406, *reference.encode(text), 49407]
    assert clip_tokenizer(text).input_ids == expected


def test_vocabulary_and_padding(clip_tokenizer):
    assert len(clip_tokenizer) == VOCAB_SIZE
    ids = clip_tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[-1] == clip_tokenizer.convert_tokens_to_ids(END_TOKEN) == 49407


def test_tokenizer_reloads_from_pipeline_folder(tiny_sd_folder, clip_tokenizer):
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(tiny_sd_folder / "tokenizer", local_files_only=True)
    text = "a blue square in the center and a pink cross in the top right on a gray background"
    assert reloaded(text).input_ids == clip_tokenizer(text).input_ids
