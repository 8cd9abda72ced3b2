# 2026-12-06 at commit 08723b0 (the batch check of 4d5dc9f in the workers started later), one worker at 4 GiB
python tools/zoo.py --source torchvision --check statistics --memory-limit-gb 4 --timeout 1200 --results docs/zoo-statistics.jsonl
# stopped at the end of the session after 85 of the 215 drawn models (zoo.py records a command when it completes): rerun it to resume
python tools/zoo.py --source timm --draw 215 --seed 0 --check statistics --memory-limit-gb 4 --timeout 1200 --results docs/zoo-statistics.jsonl
# the models over 4 GiB, at 14 GiB
python tools/zoo.py --redo --check statistics --models torchvision:vgg11_bn torchvision:vgg13_bn torchvision:vgg19_bn timm:coatnet_3_224 timm:coatnet_rmlp_3_rw_224 torchvision:regnet_y_128gf --memory-limit-gb 14 --timeout 1200 --results docs/zoo-statistics.jsonl
# 2026-12-06, next session, at commit c502f3e: the draw resumed and completed (102 models left, 18 minutes; 105 of the 215 drawn have BatchNorm, 7 of them over 4 GiB)
python tools/zoo.py --source timm --draw 215 --seed 0 --check statistics --memory-limit-gb 4 --timeout 1200 --results docs/zoo-statistics.jsonl
# 2026-12-06, at b31c4cf's package (same conversion; the eager forms only write in place): the 7 drawn models over 4 GiB, at 14 GiB, one at a time; stopped by hand during tf_efficientnet_l2 (800 px) to free the machine for the benchmarks, so that one model has no statistics row
python tools/zoo.py --redo --check statistics --models timm:halonet_h1 timm:resnet50x64_clip_gap timm:volo_d4_224 timm:xcit_large_24_p16_384 timm:xcit_large_24_p8_384 timm:tf_efficientnet_b8 timm:tf_efficientnet_l2 --memory-limit-gb 14 --timeout 1500 --results docs/zoo-statistics.jsonl
