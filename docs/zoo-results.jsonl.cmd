# rows of models not in the two sweeps below come from the earlier sweeps that README.md ("Model-zoo sweep") lists
python tools/zoo.py --source torchvision --redo --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 12 --redo --results docs/zoo-results.jsonl
# 2026-12-02 at commit 33e5c1c (corrections inside their consumers; the train/eval mode check), two workers; the models over 8 GiB again with 18
python tools/zoo.py --source torchvision --redo --jobs 2 --memory-limit-gb 8 --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 3 --redo --jobs 2 --memory-limit-gb 8 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models torchvision:regnet_y_128gf --memory-limit-gb 18 --timeout 900 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models timm:regnety_1280 timm:xcit_medium_24_p8_384 --memory-limit-gb 18 --timeout 900 --results docs/zoo-results.jsonl
# 2026-12-06 at commit 7369b1d (calibration sample sized by the shapes, near-constant channels bounded), two workers at 8 GiB
python tools/zoo.py --source torchvision --redo --jobs 2 --memory-limit-gb 8 --timeout 900 --results docs/zoo-results.jsonl
python tools/zoo.py --source timm --sample-every 3 --redo --jobs 2 --memory-limit-gb 8 --timeout 900 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models timm:efficientvit_b1 timm:efficientvit_b2 timm:efficientvit_b3 timm:efficientvit_l2 timm:efficientnet_b8 --jobs 2 --memory-limit-gb 8 --timeout 900 --results docs/zoo-results.jsonl
# then the models over 8 GiB, one at a time at 17 GiB with the in-place check (35150fe); this first command was stopped by hand after
# maxvit_xlarge_tf_384 (its last two models ran in the last line), so zoo.py did not record it itself
python tools/zoo.py --redo --models timm:regnety_2560 timm:efficientnet_l2 timm:tf_efficientnet_l2 timm:coatnet_5_224 timm:maxvit_xlarge_tf_224 timm:volo_d5_448 timm:volo_d5_512 timm:maxvit_xlarge_tf_384 timm:maxvit_large_tf_512 timm:maxvit_xlarge_tf_512 --memory-limit-gb 17 --timeout 1800 --results docs/zoo-results.jsonl
# efficientnet_l2 again after the batch check learned to tell amplified rounding (4d5dc9f), with the rest over 8 GiB
python tools/zoo.py --redo --models timm:efficientnet_l2 torchvision:regnet_y_128gf timm:tiny_vit_21m_384 timm:xcit_small_24_p8_384 timm:xcit_medium_24_p8_384 timm:regnety_1280 --memory-limit-gb 17 --timeout 1800 --results docs/zoo-results.jsonl
python tools/zoo.py --redo --models timm:maxvit_large_tf_512 timm:maxvit_xlarge_tf_512 --memory-limit-gb 17 --timeout 1500 --results docs/zoo-results.jsonl
