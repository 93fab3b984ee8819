"""Finetuning: data (patches, benchmark sets), losses, metrics (PSNR/SSIM-Y via basicsr), the loop, pictures."""
