"""Fused linear + cross-entropy: the summed loss of h @ W^T against labels, and its gradients for h
and W, computed chunk by chunk in the forward pass, so [tokens, vocab] logits never exist at once
and nothing is recomputed in backward (the technique popularized by Liger-Kernel).

Per chunk of rows: logits = h_c @ W^T (a matmul), then the Triton kernel turns each row of logits
in place into its gradient softmax(row) - onehot(label) while computing the row's loss
logsumexp(row) - row[label] (two passes over the vocabulary, an online max and sum first); then
grad_h_c = dlogits @ W and grad_W += dlogits^T @ h_c (multiplied in the logits' dtype, summed in
grad_W's). Labels equal to -100 give no loss and no
gradient. Backward only scales the stored gradients by the incoming one, in place. So the peak is
one chunk of logits, grad_h and one [vocab, dim] grad_W.

The reference is model.cross_entropy_sum (chunked, recomputed under checkpointing).
"""

import torch

from kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_rows(logits_ptr, labels_ptr, loss_ptr, n_cols, stride, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        ptr = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        valid = label != -100
        m = tl.max(tl.full((BLOCK,), -float("inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        for start in range(0, n_cols, BLOCK):  # pass 1: running max and sum of exp
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(ptr + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WANT_GRAD:
            for start in range(0, n_cols, BLOCK):  # pass 2: overwrite logits with softmax - onehot
                cols = start + tl.arange(0, BLOCK)
                live = cols < n_cols
                x = tl.load(ptr + cols, mask=live, other=0.0).to(tl.float32)
                p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
                tl.store(ptr + cols, tl.where(valid, p, 0.0).to(logits_ptr.dtype.element_ty), mask=live)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want = need_h or need_w
        n, v = h.shape[0], weight.shape[0]
        loss = torch.zeros(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        block = min(4096, triton.next_power_of_2(v))  # vocabulary columns per pass of a row's loop
        logits = None
        for i in range(0, n, chunk):
            hc = h[i:i + chunk]
            del logits  # one chunk of logits at a time: the last one goes before the next is made
            logits = (hc @ weight.t()).contiguous()
            _ce_rows[(hc.shape[0],)](logits, labels[i:i + chunk].contiguous(), loss[i:i + chunk], v, logits.stride(0),
                                     WANT_GRAD=want, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
            if grad_h is not None:
                grad_h[i:i + chunk] = logits @ weight
            if grad_w is not None:
                if logits.dtype == grad_w.dtype:
                    grad_w.addmm_(logits.t(), hc.to(logits.dtype))
                else:  # autocast: bf16 logits, fp32 master weight. Multiply in bf16 (an fp32 addmm_
                    # here was 60% of a full fine-tuning step on an H200) and add in fp32, a slice of
                    # the vocabulary at a time so the bf16 product never exceeds chunk x dim.
                    hb = hc.to(logits.dtype)
                    for j in range(0, v, chunk):
                        grad_w[j:j + chunk] += logits[:, j:j + chunk].t() @ hb
        ctx.save_for_backward(grad_h, grad_w)
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        # Scaled in place: a second [vocab, dim] weight gradient would double the loss's peak. They
        # are this function's own tensors and backward runs once (no retain_graph through a loss).
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h.mul_(g.to(grad_h.dtype)) if grad_h is not None else None,
                grad_w.mul_(g.to(grad_w.dtype)) if grad_w is not None else None, None, None)


def linear_cross_entropy_triton(h, weight, labels, chunk=4096):
    """Sum over rows of cross_entropy(h @ weight.T, labels) (-100 ignored), fused as described above."""
    return _LinearCrossEntropy.apply(h, weight, labels, max(1, chunk))
