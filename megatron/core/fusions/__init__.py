"""Elementwise ops shared by both model stacks, in one place so a faster kernel can replace them."""
