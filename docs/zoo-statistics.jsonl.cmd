# 2026-12-06 at commit 08723b0 (the batch check of 4d5dc9f in the workers started later), one worker at 4 GiB
python tools/zoo.py --source torchvision --check statistics --memory-limit-gb 4 --timeout 1200 --results docs/zoo-statistics.jsonl
# stopped at the end of the session after 85 of the 215 drawn models (zoo.py records a command when it completes): rerun it to resume
python tools/zoo.py --source timm --draw 215 --seed 0 --check statistics --memory-limit-gb 4 --timeout 1200 --results docs/zoo-statistics.jsonl
# the models over 4 GiB, at 14 GiB
python tools/zoo.py --redo --check statistics --models torchvision:vgg11_bn torchvision:vgg13_bn torchvision:vgg19_bn timm:coatnet_3_224 timm:coatnet_rmlp_3_rw_224 torchvision:regnet_y_128gf --memory-limit-gb 14 --timeout 1200 --results docs/zoo-statistics.jsonl
python tools/zoo.py --source timm --draw 215 --seed 0 --check statistics --memory-limit-gb 4 --timeout 1200 --results docs/zoo-statistics.jsonl
