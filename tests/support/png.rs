//! A small, independent PNG reader for tests: chunk walk with CRC check, IHDR, zlib/inflate (RFC 1950/1951, written
//! here from the RFCs rather than taken from the encoder's crates) and scanline unfiltering. Enough to check that a
//! chart file is a real, decodable image and to look at its pixels.

pub struct Image {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

impl Image {
    pub fn pixel(&self, x: u32, y: u32) -> &[u8] {
        let i = (y as usize * self.width as usize + x as usize) * self.channels;
        &self.pixels[i..i + self.channels]
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Width and height from the IHDR chunk only (no decompression).
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" {
        return Err("not a PNG signature".into());
    }
    if &bytes[12..16] != b"IHDR" {
        return Err("first chunk is not IHDR".into());
    }
    Ok((be32(&bytes[16..20]), be32(&bytes[20..24])))
}

pub fn decode(bytes: &[u8]) -> Result<Image, String> {
    dimensions(bytes)?;
    let mut pos = 8;
    let mut ihdr: Option<Vec<u8>> = None;
    let mut idat = Vec::new();
    let mut ended = false;
    while pos + 12 <= bytes.len() {
        let len = be32(&bytes[pos..]) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let end = pos + 8 + len;
        if end + 4 > bytes.len() {
            return Err("truncated chunk".into());
        }
        let data = &bytes[pos + 8..end];
        if crc32(&bytes[pos + 4..end]) != be32(&bytes[end..]) {
            return Err(format!("bad CRC in {} chunk", String::from_utf8_lossy(kind)));
        }
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => {
                ended = true;
                break;
            }
            _ => {}
        }
        pos = end + 4;
    }
    if !ended {
        return Err("no IEND chunk".into());
    }
    let h = ihdr.ok_or("no IHDR")?;
    let (width, height, depth, colour, interlace) = (be32(&h[0..]), be32(&h[4..]), h[8], h[9], h[12]);
    if depth != 8 || interlace != 0 {
        return Err(format!("unsupported bit depth {depth} / interlace {interlace}"));
    }
    let channels = match colour {
        0 => 1,
        2 => 3,
        4 => 2,
        6 => 4,
        c => return Err(format!("unsupported colour type {c}")),
    };
    let raw = zlib_decompress(&idat)?;
    let stride = width as usize * channels;
    if raw.len() != height as usize * (stride + 1) {
        return Err(format!("decompressed {} bytes, expected {}", raw.len(), height as usize * (stride + 1)));
    }
    let mut pixels = vec![0u8; height as usize * stride];
    let zero_row = vec![0u8; stride];
    for y in 0..height as usize {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        let (done, rest) = pixels.split_at_mut(y * stride);
        let prev: &[u8] = if y > 0 { &done[(y - 1) * stride..] } else { &zero_row };
        let cur = &mut rest[..stride];
        match filter {
            0 => cur.copy_from_slice(line),
            1 => {
                cur[..channels].copy_from_slice(&line[..channels]);
                for x in channels..stride {
                    cur[x] = line[x].wrapping_add(cur[x - channels]);
                }
            }
            2 => {
                for x in 0..stride {
                    cur[x] = line[x].wrapping_add(prev[x]);
                }
            }
            3 => {
                for x in 0..stride {
                    let a = if x >= channels { cur[x - channels] as u16 } else { 0 };
                    cur[x] = line[x].wrapping_add(((a + prev[x] as u16) / 2) as u8);
                }
            }
            4 => {
                for x in 0..stride {
                    let (a, c) =
                        if x >= channels { (cur[x - channels] as i16, prev[x - channels] as i16) } else { (0, 0) };
                    let b = prev[x] as i16;
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    let predictor = if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    };
                    cur[x] = line[x].wrapping_add(predictor as u8);
                }
            }
            f => return Err(format!("bad filter type {f}")),
        }
    }
    Ok(Image { width, height, channels, pixels })
}

fn zlib_decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    if data.len() < 6 || data[0] & 0x0F != 8 || !((data[0] as u16) << 8 | data[1] as u16).is_multiple_of(31) {
        return Err("bad zlib header".into());
    }
    let out = inflate(&data[2..])?;
    // Adler-32, reducing modulo 65521 once per 5552 bytes (the most that cannot overflow u32).
    let (mut a, mut b) = (1u32, 0u32);
    for block in out.chunks(5552) {
        for &x in block {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    if (b << 16 | a) != be32(&data[data.len() - 4..]) {
        return Err("bad Adler-32".into());
    }
    Ok(out)
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    count: u32,
}

impl Bits<'_> {
    /// The next `n` bits without consuming them (zeros past the end of the input; `count` tells how many are real).
    fn peek(&mut self, n: u32) -> u32 {
        while self.count < n && self.pos < self.data.len() {
            self.buf |= (self.data[self.pos] as u32) << self.count;
            self.pos += 1;
            self.count += 8;
        }
        self.buf & ((1u32 << n) - 1)
    }

    fn bits(&mut self, n: u32) -> Result<u32, String> {
        while self.count < n {
            let byte = *self.data.get(self.pos).ok_or("inflate: out of input")?;
            self.pos += 1;
            self.buf |= (byte as u32) << self.count;
            self.count += 8;
        }
        let v = self.buf & ((1u64 << n) - 1) as u32;
        self.buf >>= n;
        self.count -= n;
        Ok(v)
    }
}

/// Canonical Huffman code as counts per length and symbols in code order, plus a lookup table for codes of up to
/// `FAST_BITS` bits (the bit-by-bit walk alone is slow in unoptimised test builds).
struct Huffman {
    count: [i32; 16],
    symbol: Vec<u16>,
    /// Indexed by the next FAST_BITS input bits (first bit lowest): (symbol, code length), length 0 = not in table.
    fast: Vec<(u16, u8)>,
}

const FAST_BITS: u32 = 9;

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let mut count = [0i32; 16];
        for &l in lengths {
            count[l as usize] += 1;
        }
        count[0] = 0;
        let mut offs = [0usize; 16];
        for len in 1..16 {
            offs[len] = offs[len - 1] + count[len - 1] as usize;
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[offs[l as usize]] = s as u16;
                offs[l as usize] += 1;
            }
        }
        let mut fast = vec![(0u16, 0u8); 1 << FAST_BITS];
        // Canonical codes: walk lengths in order, codes increase by one within a length.
        let (mut code, mut index) = (0u32, 0usize);
        for len in 1..16u32 {
            for _ in 0..count[len as usize] {
                if len <= FAST_BITS {
                    // Codes are sent most significant bit first; the table is indexed by bits in arrival order.
                    let reversed = (0..len).fold(0u32, |r, b| r | ((code >> b) & 1) << (len - 1 - b));
                    let mut fill = reversed;
                    while fill < (1 << FAST_BITS) {
                        fast[fill as usize] = (symbol[index], len as u8);
                        fill += 1 << len;
                    }
                }
                code += 1;
                index += 1;
            }
            code <<= 1;
        }
        Huffman { count, symbol, fast }
    }

    fn decode(&self, bits: &mut Bits) -> Result<u16, String> {
        let (sym, len) = self.fast[bits.peek(FAST_BITS) as usize];
        if len > 0 && (len as u32) <= bits.count {
            bits.buf >>= len;
            bits.count -= len as u32;
            return Ok(sym);
        }
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.bits(1)? as i32;
            let count = self.count[len];
            if code - count < first {
                return Ok(self.symbol[(index + (code - first)) as usize]);
            }
            index += count;
            first += count;
            first <<= 1;
            code <<= 1;
        }
        Err("inflate: bad code".into())
    }
}

const LEN_BASE: [u16; 29] =
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
const LEN_EXTRA: [u8; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
    8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] =
    [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];

pub fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut bits = Bits { data, pos: 0, buf: 0, count: 0 };
    let mut out: Vec<u8> = Vec::new();
    loop {
        let last = bits.bits(1)?;
        match bits.bits(2)? {
            0 => {
                bits.buf = 0;
                bits.count = 0;
                let p = bits.pos;
                if p + 4 > data.len() {
                    return Err("inflate: truncated stored block".into());
                }
                let len = u16::from_le_bytes([data[p], data[p + 1]]) as usize;
                let nlen = u16::from_le_bytes([data[p + 2], data[p + 3]]) as usize;
                if len != !nlen & 0xFFFF || p + 4 + len > data.len() {
                    return Err("inflate: bad stored block".into());
                }
                out.extend_from_slice(&data[p + 4..p + 4 + len]);
                bits.pos = p + 4 + len;
            }
            1 => {
                let mut lengths = [0u8; 288];
                for (i, l) in lengths.iter_mut().enumerate() {
                    *l = match i {
                        0..=143 => 8,
                        144..=255 => 9,
                        256..=279 => 7,
                        _ => 8,
                    };
                }
                codes(&mut bits, &mut out, &Huffman::new(&lengths), &Huffman::new(&[5u8; 30]))?;
            }
            2 => {
                let nlen = bits.bits(5)? as usize + 257;
                let ndist = bits.bits(5)? as usize + 1;
                let ncode = bits.bits(4)? as usize + 4;
                const ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
                let mut cl = [0u8; 19];
                for &o in ORDER.iter().take(ncode) {
                    cl[o] = bits.bits(3)? as u8;
                }
                let clh = Huffman::new(&cl);
                let mut lengths = vec![0u8; nlen + ndist];
                let mut i = 0;
                while i < nlen + ndist {
                    let sym = clh.decode(&mut bits)?;
                    let (value, repeat) = match sym {
                        0..=15 => (sym as u8, 1),
                        16 => (
                            *lengths.get(i.wrapping_sub(1)).ok_or("inflate: repeat with no previous")?,
                            3 + bits.bits(2)?,
                        ),
                        17 => (0, 3 + bits.bits(3)?),
                        _ => (0, 11 + bits.bits(7)?),
                    };
                    for _ in 0..repeat {
                        *lengths.get_mut(i).ok_or("inflate: too many lengths")? = value;
                        i += 1;
                    }
                }
                codes(&mut bits, &mut out, &Huffman::new(&lengths[..nlen]), &Huffman::new(&lengths[nlen..]))?;
            }
            _ => return Err("inflate: bad block type".into()),
        }
        if last == 1 {
            return Ok(out);
        }
    }
}

fn codes(bits: &mut Bits, out: &mut Vec<u8>, lit: &Huffman, dist: &Huffman) -> Result<(), String> {
    loop {
        let sym = lit.decode(bits)? as usize;
        match sym {
            0..=255 => out.push(sym as u8),
            256 => return Ok(()),
            _ => {
                let s = sym - 257;
                if s >= 29 {
                    return Err("inflate: bad length symbol".into());
                }
                let len = LEN_BASE[s] as usize + bits.bits(LEN_EXTRA[s] as u32)? as usize;
                let d = dist.decode(bits)? as usize;
                if d >= 30 {
                    return Err("inflate: bad distance symbol".into());
                }
                let distance = DIST_BASE[d] as usize + bits.bits(DIST_EXTRA[d] as u32)? as usize;
                if distance > out.len() {
                    return Err("inflate: distance too far back".into());
                }
                let start = out.len() - distance;
                if distance >= len {
                    out.extend_from_within(start..start + len);
                } else {
                    for k in 0..len {
                        out.push(out[start + k]);
                    }
                }
            }
        }
    }
}

/// Checks that `text` looks like a complete SVG document: an `<svg` root with width and height, properly nested
/// tags, and at least `min_elements` elements. Returns the element count.
pub fn check_svg(text: &str, min_elements: usize) -> Result<usize, String> {
    let t = text.trim_start();
    let t = if t.starts_with("<?xml") { &t[t.find("?>").ok_or("unterminated XML declaration")? + 2..] } else { t };
    let t = t.trim_start();
    if !t.starts_with("<svg") {
        return Err("root element is not <svg>".into());
    }
    let root_end = t.find('>').ok_or("unterminated <svg> tag")?;
    let root = &t[..root_end];
    if !root.contains("width=") || !root.contains("height=") {
        return Err("<svg> without width/height".into());
    }
    let mut stack: Vec<String> = Vec::new();
    let mut elements = 0;
    let mut rest = t;
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
        let tag = &rest[open + 1..close];
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().ok_or_else(|| format!("closing </{name}> with nothing open"))?;
            if top != name.trim() {
                return Err(format!("</{name}> closes <{top}>"));
            }
        } else if !tag.starts_with('!') && !tag.starts_with('?') {
            elements += 1;
            let name: String = tag.chars().take_while(|c| !c.is_whitespace() && *c != '/').collect();
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        rest = &rest[close + 1..];
    }
    if !stack.is_empty() {
        return Err(format!("unclosed elements: {stack:?}"));
    }
    if !rest.trim().is_empty() {
        return Err("text after the root element".into());
    }
    if elements < min_elements {
        return Err(format!("only {elements} elements"));
    }
    Ok(elements)
}
