//! TFRecord framing, as TensorFlow writes and TensorBoard reads event files: each record is
//! its length (u64, little-endian), the masked CRC-32C of those 8 bytes, the data, and the
//! masked CRC-32C of the data.

/// TensorFlow's mask: a CRC of data holding CRCs is a poor check, so stored CRCs are rotated
/// and offset.
const MASK_DELTA: u32 = 0xa282_ead8;

fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(MASK_DELTA)
}

/// One record around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The whole, intact records at the start of `bytes`, in order. Reading stops at the first
/// record that is cut short or fails a checksum: what is left of a file a crash cut mid-write.
pub fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 12 {
        let (len, tail) = rest.split_at(8);
        let crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if crc != masked_crc(len) {
            break;
        }
        let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
        let tail = &tail[4..];
        let fits = |n: &usize| n.checked_add(4).is_some_and(|m| m <= tail.len());
        let Some(n) = usize::try_from(n).ok().filter(fits) else {
            break;
        };
        let (data, tail) = tail.split_at(n);
        let crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            break;
        }
        out.push(data);
        rest = &tail[4..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis_and_the_mask_is_tensorflows() {
        // The standard check value of CRC-32C (Castagnoli), not of the zlib CRC-32.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let crc = crc32c::crc32c(b"foo");
        let masked = masked_crc(b"foo");
        assert_ne!(masked, crc);
        // TensorFlow's unmask: rot = masked - delta; crc = (rot >> 17) | (rot << 15).
        let rot = masked.wrapping_sub(MASK_DELTA);
        assert_eq!(rot.rotate_left(15), crc);
    }

    #[test]
    fn records_read_back_whole_and_stop_at_a_cut_or_a_flipped_bit() {
        let data: [&[u8]; 3] = [b"first", b"", &[7u8; 300]];
        let file: Vec<u8> = data.iter().flat_map(|d| frame(d)).collect();
        assert_eq!(records(&file), data);
        // Cut anywhere inside the last record: the first two remain.
        let last_start = file.len() - (300 + 16);
        for cut in [
            last_start + 1,
            last_start + 11,
            last_start + 12,
            file.len() - 1,
        ] {
            assert_eq!(records(&file[..cut]), data[..2], "cut at {cut}");
        }
        // Records start at 0, 21 ("first": 5 + 16 bytes) and 37 (the empty one: 16 bytes).
        let mut bad = file.clone();
        bad[21 + 8] ^= 0x10; // the second record's length checksum
        assert_eq!(records(&bad), data[..1]);
        let mut flipped = file;
        flipped[37 + 12 + 3] ^= 1; // inside the third record's data
        assert_eq!(records(&flipped), data[..2]);
    }
}
