"""Training recipes of FastGPT's vision-language model: PEFT adapter configurations and a word-level tokenizer.

The model, its configuration and its processor are `fastgpt_hf.modeling_fastgpt_vl`, `configuration_fastgpt_vl` and
`processing_fastgpt_vl`, beside the text model's modules so that a checkpoint's copied code is one flat folder.
"""
