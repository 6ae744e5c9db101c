//! Matrix products on host slices through `gemm` (AVX-512 / AVX2 kernels chosen at run time),
//! on dense or strided operands, written into fresh memory or accumulated.
//!
//! Every matrix here is row-major; `[rows, cols]` in the comments.

/// A matrix operand as stored, row-major with its rows `ld` values apart (a column block of a
/// wider matrix when `ld` exceeds its width), read transposed when `t`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub ld: usize,
    pub t: bool,
}

impl<'a> Mat<'a> {
    /// `data` as stored `[rows, cols]` (`cols` values per row), transposed when `t`.
    pub fn dense(data: &'a [f32], cols: usize, t: bool) -> Self {
        Self { data, ld: cols, t }
    }

    /// Checks that `op(self)` can be read as `[rows, cols]`; returns (row stride, column
    /// stride) of `op(self)` in elements.
    fn strides(&self, rows: usize, cols: usize) -> (isize, isize) {
        let (stored_rows, stored_cols) = if self.t { (cols, rows) } else { (rows, cols) };
        assert!(
            self.ld >= stored_cols,
            "rows {} apart hold {stored_cols} values",
            self.ld
        );
        if stored_rows > 0 && stored_cols > 0 {
            assert!(
                (stored_rows - 1) * self.ld + stored_cols <= self.data.len(),
                "operand too short"
            );
        }
        if self.t {
            (1, self.ld as isize)
        } else {
            (self.ld as isize, 1)
        }
    }
}

/// `c (+)= op(a) · op(b)` with `op(a)` `[m, k]` and `op(b)` `[k, n]`; `ta`/`tb` read `a`
/// stored `[k, m]` / `b` stored `[n, k]` (a transposed view, no copy). With `acc` the product
/// is added to `c`, else it replaces it.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: &mut [f32],
    acc: bool,
) {
    let (a, b) = dense_operands(m, n, k, a, ta, b, tb);
    matmul_ld(m, n, k, a, b, c, n, acc);
}

/// `a` and `b` as dense operands of an `[m, k]·[k, n]` product (`ta`/`tb`: stored transposed).
fn dense_operands<'a>(
    m: usize,
    n: usize,
    k: usize,
    a: &'a [f32],
    ta: bool,
    b: &'a [f32],
    tb: bool,
) -> (Mat<'a>, Mat<'a>) {
    (
        Mat::dense(a, if ta { m } else { k }, ta),
        Mat::dense(b, if tb { k } else { n }, tb),
    )
}

/// [`matmul`] on strided operands, into `c` with rows `ldc` values apart.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ld(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    assert!(
        ldc >= n && (m == 0 || (m - 1) * ldc + n <= c.len()),
        "c too short"
    );
    // SAFETY: c holds the m rows of n values `ldc` apart (asserted), initialised and borrowed
    // exclusively.
    unsafe { gemm_into(m, n, k, a, b, c.as_mut_ptr(), ldc, acc) }
}

/// `op(a) · op(b)` as a new `[m, n]` (see [`matmul`]), written straight into fresh memory.
pub fn product(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
    let (a, b) = dense_operands(m, n, k, a, ta, b, tb);
    product_ld(m, n, k, a, b)
}

/// [`product`] of strided operands.
pub fn product_ld(m: usize, n: usize, k: usize, a: Mat, b: Mat) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * n);
    append_product(&mut c, m, n, k, a, b);
    c
}

/// Appends `op(a) · op(b)` (`[m, n]`, row-major) to `c`, written straight into its spare
/// capacity.
pub fn append_product(c: &mut Vec<f32>, m: usize, n: usize, k: usize, a: Mat, b: Mat) {
    c.reserve(m * n);
    let len = c.len();
    // SAFETY: the spare capacity holds m·n values; gemm without `acc` only writes them (and
    // gemm_into zero-fills when k = 0), so all are initialised before set_len.
    unsafe {
        gemm_into(
            m,
            n,
            k,
            a,
            b,
            c.spare_capacity_mut().as_mut_ptr().cast(),
            n,
            false,
        );
        c.set_len(len + m * n);
    }
}

/// # Safety
/// `c` must be valid for writes of `m` rows of `n` values `ldc` apart, and for reads of them
/// when `acc`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let (a_rs, a_cs) = a.strides(m, k);
    let (b_rs, b_cs) = b.strides(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                std::ptr::write_bytes(c.add(r * ldc), 0, n);
            }
        }
        return;
    }
    // SAFETY: `strides` bounds every index gemm reads of op(a) (m×k) and op(b) (k×n); c is
    // valid as the caller promises; without `acc` gemm does not read c.
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        acc,
        a.data.as_ptr(),
        a_cs,
        a_rs,
        b.data.as_ptr(),
        b_cs,
        b_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_transposes_accumulates_and_reads_column_blocks() {
        // a [2,3], b [3,2]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut c = [1.0; 4];
        matmul(2, 2, 3, &a, false, &b, false, &mut c, true);
        assert_eq!(c, [59.0, 65.0, 140.0, 155.0]);
        // aᵀ stored as [3,2] (= a read transposed), bᵀ stored as [2,3].
        let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let bt = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0];
        let mut c = [0.0; 4];
        matmul(2, 2, 3, &at, true, &bt, true, &mut c, false);
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
        // Column blocks: b's columns 1..3 of a [3, 4] store (rows 4 apart), read straight and
        // transposed, into columns 1..3 of a [2, 4] c (rows 4 apart); column 0 and 3 untouched.
        let wide = [
            0.0, 7.0, 8.0, 0.0, 0.0, 9.0, 10.0, 0.0, 0.0, 11.0, 12.0, 0.0,
        ];
        let b = Mat {
            data: &wide[1..],
            ld: 4,
            t: false,
        };
        let mut c = [-1.0; 8];
        matmul_ld(2, 2, 3, Mat::dense(&a, 3, false), b, &mut c[1..], 4, false);
        assert_eq!(c, [-1.0, 58.0, 64.0, -1.0, -1.0, 139.0, 154.0, -1.0]);
        // bᵀ's rows as columns of a wider store: [2, 3] read with rows 4 apart.
        let wide_t = [7.0, 9.0, 11.0, 0.0, 8.0, 10.0, 12.0, 0.0];
        let bt = Mat {
            data: &wide_t,
            ld: 4,
            t: true,
        };
        assert_eq!(
            product_ld(2, 2, 3, Mat::dense(&a, 3, false), bt),
            [58.0, 64.0, 139.0, 154.0]
        );
        let mut appended = vec![5.0];
        append_product(&mut appended, 2, 2, 3, Mat::dense(&a, 3, false), bt);
        assert_eq!(appended, [5.0, 58.0, 64.0, 139.0, 154.0]);
    }
}
