"""Export of converted models: ONNX with 1-bit srbinarize ops (`onnx`), QDQ for FQSR (`qdq`), deployment (`upscale`)."""
