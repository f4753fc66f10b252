import torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
torch.backends.cuda.enable_flash_sdp(False); torch.backends.cuda.enable_mem_efficient_sdp(False)
torch.backends.cuda.enable_math_sdp(False)
B,T,H,Hkv,D=48,2048,8,4,64
def run(name, kvh, gqa):
    q=torch.randn(B,T,H,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    k=torch.randn(B,T,kvh,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    v=torch.randn(B,T,kvh,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    g=torch.randn(B,T,H,D,device='cuda',dtype=torch.bfloat16)
    def f():
        y=F.scaled_dot_product_attention(q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),is_causal=True,enable_gqa=gqa).transpose(1,2)
        y.backward(g)
    for _ in range(5): f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10): f()
        torch.cuda.synchronize()
    tot={}
    for e in prof.key_averages():
        if e.device_type==torch.autograd.DeviceType.CUDA and e.self_device_time_total>0:
            tot[e.key]=e.self_device_time_total/10
    print(f"== {name}: total {sum(tot.values()):.1f} us per layer fwd+bwd")
    for kname,us in sorted(tot.items(), key=lambda kv:-kv[1])[:8]: print(f"   {us:8.1f} {kname[:110]}")
    ref = (q.grad.float().norm().item(), k.grad.float().norm().item())
    return ref
run("repeated K/V (8 heads)", H, False)
run("enable_gqa (4 KV heads)", Hkv, True)
run("repeated K/V (8 heads) again", H, False)
