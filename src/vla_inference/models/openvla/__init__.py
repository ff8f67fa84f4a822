"""OpenVLA 7B (openvla/openvla-7b): Prismatic DINOv2+SigLIP vision, MLP projector, Llama-2 decoder.

model.py (the network), checkpoint.py (the HF checkpoint directory), policy.py (VLAModel).
"""
