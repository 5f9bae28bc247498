//! Shamir secret sharing over GF(2^8), as sops uses it for `key_groups`.
//!
//! With several key groups, sops splits the data key into one share per group
//! (its `shamir` package is HashiCorp Vault's): every byte of the secret is
//! the constant term of its own random polynomial of degree `threshold - 1`
//! over GF(2^8) with the AES reduction polynomial x^8+x^4+x^3+x+1 (0x11B); a
//! share is the polynomial values at one x-coordinate followed by that
//! x-coordinate as the last byte. Combining is Lagrange interpolation at
//! x = 0, byte by byte. Any `threshold` shares give the secret; fewer give
//! unrelated bytes (which the MAC check then rejects).

use zeroize::Zeroizing;

/// Multiplication in GF(2^8) modulo 0x11B (constant time: no table lookups,
/// no data-dependent branches).
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut r = 0u8;
    for _ in 0..8 {
        r ^= a & (0u8.wrapping_sub(b & 1));
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1B & carry);
        b >>= 1;
    }
    r
}

/// Multiplicative inverse (a^254); `inv(0)` is 0 and never used.
fn inv(a: u8) -> u8 {
    let mut result = 1u8;
    let mut base = a;
    let mut e = 254u8;
    while e > 0 {
        if e & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    result
}

/// Combines shares into the secret. Errors name the problem without any byte
/// of a share.
pub(crate) fn combine(parts: &[Zeroizing<Vec<u8>>]) -> Result<Zeroizing<Vec<u8>>, String> {
    if parts.len() < 2 {
        return Err("fewer than two Shamir shares cannot be combined".into());
    }
    let len = parts[0].len();
    if len < 2 {
        return Err("Shamir shares must be at least two bytes".into());
    }
    if parts.iter().any(|p| p.len() != len) {
        return Err("Shamir shares have different lengths".into());
    }
    let xs: Vec<u8> = parts.iter().map(|p| p[len - 1]).collect();
    for (i, x) in xs.iter().enumerate() {
        if xs[..i].contains(x) {
            return Err("two Shamir shares have the same x-coordinate".into());
        }
    }
    // Lagrange basis values at x = 0: prod_{j != i} x_j / (x_i + x_j).
    let mut basis = vec![0u8; xs.len()];
    for i in 0..xs.len() {
        let mut b = 1u8;
        for j in 0..xs.len() {
            if i != j {
                b = mul(b, mul(xs[j], inv(xs[i] ^ xs[j])));
            }
        }
        basis[i] = b;
    }
    let mut secret = Zeroizing::new(vec![0u8; len - 1]);
    for (k, out) in secret.iter_mut().enumerate() {
        let mut acc = 0u8;
        for (p, b) in parts.iter().zip(&basis) {
            acc ^= mul(p[k], *b);
        }
        *out = acc;
    }
    Ok(secret)
}

/// Splits a secret into `n` shares of which any `threshold` recover it. Only
/// the test encryptor needs this; `coeff` supplies the random coefficients
/// and x-coordinates (any bytes; x-coordinates are made distinct and
/// non-zero).
#[cfg(test)]
pub(crate) fn split(
    secret: &[u8],
    n: usize,
    threshold: usize,
    mut coeff: impl FnMut() -> u8,
) -> Vec<Zeroizing<Vec<u8>>> {
    assert!(threshold >= 2 && threshold <= n && n < 255);
    let mut xs: Vec<u8> = Vec::new();
    while xs.len() < n {
        let x = coeff();
        if x != 0 && !xs.contains(&x) {
            xs.push(x);
        }
    }
    let mut shares: Vec<Zeroizing<Vec<u8>>> = xs
        .iter()
        .map(|_| Zeroizing::new(Vec::with_capacity(secret.len() + 1)))
        .collect();
    for &s in secret {
        let mut poly = vec![s];
        poly.extend((1..threshold).map(|_| coeff()));
        for (share, &x) in shares.iter_mut().zip(&xs) {
            // Horner evaluation.
            let mut y = 0u8;
            for &c in poly.iter().rev() {
                y = mul(y, x) ^ c;
            }
            share.push(y);
        }
    }
    for (share, &x) in shares.iter_mut().zip(&xs) {
        share.push(x);
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_arithmetic() {
        // The AES field: 0x53 * 0xCA = 1 (FIPS-197 example), 0x57 * 0x83 = 0xC1.
        assert_eq!(mul(0x53, 0xCA), 1);
        assert_eq!(mul(0x57, 0x83), 0xC1);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
        }
    }

    #[test]
    fn split_and_combine() {
        let secret: Vec<u8> = (0..32).collect();
        let mut state = 0x1234_5678u32;
        let rng = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        };
        let shares = split(&secret, 5, 3, rng);
        for combo in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let parts: Vec<_> = combo.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(&combine(&parts).unwrap()[..], &secret[..]);
        }
        // More shares than needed still work; fewer give something else.
        assert_eq!(&combine(&shares).unwrap()[..], &secret[..]);
        assert_ne!(&combine(&shares[..2]).unwrap()[..], &secret[..]);
        assert!(combine(&shares[..1]).is_err());
        assert!(combine(&[shares[0].clone(), shares[0].clone()]).is_err());
    }
}
