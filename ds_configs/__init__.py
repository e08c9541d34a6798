"""DeepSpeed JSON templates (zero2, zero3, zero3_offload), installed as `megaflow.ds_configs`.

Read and copy them from here; "auto" values are filled from the recipe at start-up.
"""
