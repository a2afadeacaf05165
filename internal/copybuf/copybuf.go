// Package copybuf lends the buffers that move bodies from one connection
// to another: big enough that a large body takes few reads and writes
// (32 KiB, as io.Copy and httputil.ReverseProxy use), pooled so that a
// request does not allocate one.
package copybuf

import "sync"

// Size is the length of every buffer: big enough for bulk transfers, small
// enough that 10,000 concurrent watches, each holding one, cost little.
const Size = 32 << 10

var pool = sync.Pool{New: func() any { b := make([]byte, Size); return &b }}

// Get returns a buffer of Size bytes; give it back with Put.
func Get() *[]byte { return pool.Get().(*[]byte) }

// Put takes back a buffer from Get.
func Put(b *[]byte) { pool.Put(b) }

// ReverseProxyPool lends the buffers to httputil.ReverseProxy (its
// BufferPool), which otherwise allocates one per request.
type ReverseProxyPool struct{}

// Get implements httputil.BufferPool.
func (ReverseProxyPool) Get() []byte { return *Get() }

// Put implements httputil.BufferPool.
func (ReverseProxyPool) Put(b []byte) { Put(&b) }
