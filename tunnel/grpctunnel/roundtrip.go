package grpctunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"

	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/grpctool"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/kubernetesapirpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/prototool"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelinfo"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
)

// chunkSize is how much of a request body one data message carries: far
// below the gRPC message limit, large enough for few messages per MiB.
const chunkSize = 32 << 10

var chunkBuffers = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// connectStream is the server side of one ReverseTunnel/Connect call.
type connectStream = grpc.BidiStreamingServer[reversetunnelrpc.ConnectRequest, reversetunnelrpc.ConnectResponse]

// idleStream is a Connect stream offered for one request.
type idleStream struct {
	stream connectStream
	// claimed is closed when a request takes the stream.
	claimed chan struct{}
	// finished receives the result of the Connect call once the request
	// is done with the stream; the call returns it.
	finished   chan error
	finishOnce sync.Once
}

func newIdleStream(s connectStream) *idleStream {
	return &idleStream{stream: s, claimed: make(chan struct{}), finished: make(chan error, 1)}
}

// finish ends the Connect call with err (nil: the request completed). A
// non-nil err resets the stream, which cancels the request in agentk and
// interrupts a Recv in progress.
func (is *idleStream) finish(err error) {
	is.finishOnce.Do(func() { is.finished <- err })
}

// servesMakeRequest reports whether a tunnel's descriptor offers
// KubernetesApi/MakeRequest (gitlab-wire §B.3: a tunnel is matched by the
// service and method it describes).
func servesMakeRequest(d *reversetunnelinfo.AgentDescriptor) bool {
	for _, s := range d.GetServices() {
		if s.GetName() != kubernetesAPIService {
			continue
		}
		for _, m := range s.GetMethods() {
			if m.GetName() == makeRequestMethod {
				return true
			}
		}
	}
	return false
}

// roundTrip makes one MakeRequest call on the claimed stream. release is
// called once the request no longer counts towards the tunnel's load.
func (is *idleStream) roundTrip(req *tunnel.Request, release func()) (*http.Response, error) {
	r := req.HTTP
	ctx := r.Context()
	// The client going away ends the call; the stop function keeps a
	// finished call from holding the callback.
	stopWatch := context.AfterFunc(ctx, func() {
		is.finish(grpcstatus.Error(codes.Canceled, "request canceled"))
	})
	fail := func(err error) (*http.Response, error) {
		stopWatch()
		is.finish(grpcstatus.Error(codes.Aborted, "request failed"))
		if ctxErr := context.Cause(ctx); ctxErr != nil {
			return nil, ctxErr
		}
		return nil, err
	}

	header, err := requestHeader(req)
	if err != nil {
		return fail(err)
	}
	if err := is.stream.Send(&reversetunnelrpc.ConnectResponse{Msg: &reversetunnelrpc.ConnectResponse_RequestInfo{
		RequestInfo: &reversetunnelrpc.RequestInfo{MethodName: makeRequestPath},
	}}); err != nil {
		return fail(fmt.Errorf("sending the request: %w", err))
	}
	if err := is.send(header); err != nil {
		return fail(fmt.Errorf("sending the request: %w", err))
	}
	body := r.Body
	if body == http.NoBody {
		body = nil
	}
	switch {
	case req.Upgrade != "":
		// After the trailer, the body carries the client's bytes once
		// the cluster switched.
		go is.pump(body, true)
	case body != nil:
		go is.pump(body, false)
	default:
		if err := is.endRequest(); err != nil {
			return fail(fmt.Errorf("sending the request: %w", err))
		}
	}

	rb := &responseBody{is: is, release: release, stopWatch: stopWatch}
	resp, err := rb.readHeader()
	if err != nil {
		return fail(err)
	}
	resp.Request = r
	if req.Upgrade != "" && resp.StatusCode == http.StatusSwitchingProtocols {
		rb.switched = true
		upgrade := resp.Header.Get("Upgrade")
		httpheader.RemoveHopByHop(resp.Header)
		resp.Header.Set("Upgrade", upgrade)
	}
	return resp, nil
}

// send sends one HttpRequest message in a message frame.
func (is *idleStream) send(m *grpctool.HttpRequest) error {
	data, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return is.stream.Send(&reversetunnelrpc.ConnectResponse{Msg: &reversetunnelrpc.ConnectResponse_Message{
		Message: &reversetunnelrpc.Message{Data: data},
	}})
}

// endRequest sends the end of the request body and the end of what KAS
// sends (close_send, gitlab-wire §B.4).
func (is *idleStream) endRequest() error {
	if err := is.send(&grpctool.HttpRequest{Message: &grpctool.HttpRequest_Trailer_{Trailer: &grpctool.HttpRequest_Trailer{}}}); err != nil {
		return err
	}
	return is.closeSend()
}

func (is *idleStream) closeSend() error {
	return is.stream.Send(&reversetunnelrpc.ConnectResponse{Msg: &reversetunnelrpc.ConnectResponse_CloseSend{
		CloseSend: &reversetunnelrpc.CloseSend{},
	}})
}

// pump streams body to agentk as it arrives: data messages then the
// trailer, or for an upgrade the trailer then upgradeData messages. It is
// the only sender once started, and ends when body ends or the stream
// fails; a failure ends the call.
func (is *idleStream) pump(body io.ReadCloser, upgrade bool) {
	defer body.Close()
	if upgrade {
		if err := is.send(&grpctool.HttpRequest{Message: &grpctool.HttpRequest_Trailer_{Trailer: &grpctool.HttpRequest_Trailer{}}}); err != nil {
			return
		}
	}
	bufp := chunkBuffers.Get().(*[]byte)
	defer chunkBuffers.Put(bufp)
	buf := *bufp
	for {
		n, readErr := body.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			var m *grpctool.HttpRequest
			if upgrade {
				m = &grpctool.HttpRequest{Message: &grpctool.HttpRequest_UpgradeData_{UpgradeData: &grpctool.HttpRequest_UpgradeData{Data: chunk}}}
			} else {
				m = &grpctool.HttpRequest{Message: &grpctool.HttpRequest_Data_{Data: &grpctool.HttpRequest_Data{Data: chunk}}}
			}
			if err := is.send(m); err != nil {
				return // the call is over; the response side reports why
			}
		}
		switch {
		case readErr == io.EOF:
			if upgrade {
				is.closeSend() // the client half-closed
				return
			}
			is.endRequest()
			return
		case readErr != nil:
			// A body cut short must not look complete to the cluster.
			is.finish(grpcstatus.Error(codes.Aborted, "request body failed"))
			return
		}
	}
}

// requestHeader encodes the head of req (gitlab-wire §B.7).
func requestHeader(req *tunnel.Request) (*grpctool.HttpRequest, error) {
	r := req.HTTP
	query, _ := url.ParseQuery(r.URL.RawQuery) // as GitLab's KAS: a malformed pair is dropped
	header := toValues(r.Header)
	if req.Upgrade != "" {
		// GitLab's agentk sees an upgrade in the request's own headers,
		// as the apiserver will.
		header["Connection"] = &prototool.Values{Value: []string{"Upgrade"}}
		header["Upgrade"] = &prototool.Values{Value: []string{req.Upgrade}}
	}
	h := &grpctool.HttpRequest_Header{
		Request: &prototool.HttpRequest{
			Method:  r.Method,
			Header:  header,
			UrlPath: r.URL.Path,
			Query:   toValues(query),
		},
		ContentLength: proto.Int64(contentLength(req)),
	}
	if req.Identity != nil {
		extra, err := anypb.New(&kubernetesapirpc.HeaderExtra{ImpConfig: impersonationConfig(req.Identity)})
		if err != nil {
			return nil, fmt.Errorf("encoding the identity: %w", err)
		}
		h.Extra = extra
	}
	return &grpctool.HttpRequest{Message: &grpctool.HttpRequest_Header_{Header: h}}, nil
}

// contentLength is the header's content_length: -1 when a body of unknown
// size follows, 0 for none (and for an upgrade, whose bytes travel as
// upgrade data), else the size.
func contentLength(req *tunnel.Request) int64 {
	r := req.HTTP
	switch {
	case req.Upgrade != "", r.Body == nil, r.Body == http.NoBody:
		return 0
	case r.ContentLength > 0:
		return r.ContentLength
	default:
		return -1
	}
}

func toValues[M ~map[string][]string](m M) map[string]*prototool.Values {
	out := make(map[string]*prototool.Values, len(m))
	for k, vs := range m {
		out[k] = &prototool.Values{Value: vs}
	}
	return out
}

// impersonationConfig is id the way GitLab's agentk reads it, extra keys
// in order so that the same identity always encodes the same.
func impersonationConfig(id *identity.Identity) *kubernetesapirpc.ImpersonationConfig {
	c := &kubernetesapirpc.ImpersonationConfig{Username: id.Username, Groups: id.Groups, Uid: id.UID}
	keys := make([]string, 0, len(id.Extra))
	for k := range id.Extra {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		c.Extra = append(c.Extra, &kubernetesapirpc.ExtraKeyVal{Key: k, Val: id.Extra[k]})
	}
	return c
}

// errNoResponse means the agent ended the call without an HTTP response.
var errNoResponse = errors.New("the agent ended the request without a response")

// responseBody reads agentk's answer from the stream as the caller reads
// the body, so that gRPC flow control holds back only this stream when the
// caller reads slowly.
type responseBody struct {
	is        *idleStream
	release   func()
	stopWatch func() bool
	switched  bool // the cluster switched protocols: upgrade data follows the trailer

	closed    atomic.Bool
	closeOnce sync.Once

	mu      sync.Mutex // guards the fields below and serialises Read
	pending []byte     // data received and not yet read
	err     error      // sticky: io.EOF at the end, or why it failed
}

// readHeader reads up to the response header and returns the response
// with this body.
func (b *responseBody) readHeader() (*http.Response, error) {
	for {
		m, err := b.next()
		if err != nil {
			return nil, err
		}
		if h := m.GetHeader(); h != nil {
			resp := h.GetResponse()
			header := make(http.Header, len(resp.GetHeader()))
			for k, v := range resp.GetHeader() {
				header[http.CanonicalHeaderKey(k)] = v.GetValue()
			}
			return &http.Response{
				StatusCode:    int(resp.GetStatusCode()),
				Status:        resp.GetStatus(),
				Proto:         "HTTP/1.1",
				ProtoMajor:    1,
				ProtoMinor:    1,
				Header:        header,
				Body:          b,
				ContentLength: -1,
			}, nil
		}
		// Nothing else may come before the header (gitlab-wire §B.4).
		return nil, fmt.Errorf("agent sent %T before the response header", m.GetMessage())
	}
}

// next returns the next HttpResponse message, reading past the gRPC
// header frame. The end of the call is io.EOF; an error frame is its gRPC
// status.
func (b *responseBody) next() (*grpctool.HttpResponse, error) {
	for {
		f, err := b.is.stream.Recv()
		if err != nil {
			if err == io.EOF {
				return nil, errNoResponse
			}
			return nil, fmt.Errorf("reading the response: %w", err)
		}
		switch msg := f.GetMsg().(type) {
		case *reversetunnelrpc.ConnectRequest_Header:
			continue // metadata of agentk's own call: nothing for the client
		case *reversetunnelrpc.ConnectRequest_Message:
			var m grpctool.HttpResponse
			if err := proto.Unmarshal(msg.Message.GetData(), &m); err != nil {
				return nil, fmt.Errorf("malformed response message from the agent: %w", err)
			}
			return &m, nil
		case *reversetunnelrpc.ConnectRequest_Trailer:
			return nil, io.EOF
		case *reversetunnelrpc.ConnectRequest_Error:
			return nil, agentError(msg.Error)
		default:
			return nil, fmt.Errorf("agent sent %T in a tunnel in use", f.GetMsg())
		}
	}
}

// agentError turns an error frame into a gRPC status error.
func agentError(e *reversetunnelrpc.Error) error {
	var st status.Status
	if err := proto.Unmarshal(e.GetStatus(), &st); err != nil {
		return fmt.Errorf("malformed error from the agent: %w", err)
	}
	return fmt.Errorf("agent: %w", grpcstatus.ErrorProto(&st))
}

// Read implements io.Reader.
func (b *responseBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for len(b.pending) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		b.fill()
	}
	n := copy(p, b.pending)
	b.pending = b.pending[n:]
	return n, nil
}

// fill reads one message into pending or sets err.
func (b *responseBody) fill() {
	if b.closed.Load() {
		b.err = errors.New("read on a closed response body")
		return
	}
	m, err := b.next()
	switch {
	case err == io.EOF && b.switched:
		b.end(nil) // the cluster's side of the switched connection ended
		return
	case err == io.EOF, errors.Is(err, errNoResponse):
		b.end(io.ErrUnexpectedEOF) // the call ended before the response did
		return
	case err != nil:
		b.end(err)
		return
	}
	switch msg := m.GetMessage().(type) {
	case *grpctool.HttpResponse_Data_:
		b.pending = msg.Data.GetData()
	case *grpctool.HttpResponse_UpgradeData_:
		b.pending = msg.UpgradeData.GetData()
	case *grpctool.HttpResponse_Trailer_:
		if !b.switched {
			b.drain()
		}
	default:
		b.end(fmt.Errorf("agent sent %T inside the response body", msg))
	}
}

// drain reads what follows a complete response: agentk's gRPC trailer
// and the end of its stream, then ends the call successfully.
func (b *responseBody) drain() {
	for {
		_, err := b.next()
		switch {
		case err == io.EOF, errors.Is(err, errNoResponse):
			b.end(nil)
			return
		case err != nil:
			b.end(err)
			return
		}
		// A message after the response: not allowed, but harmless.
	}
}

// end records the end of the body: io.EOF for the caller on success.
func (b *responseBody) end(err error) {
	if err == nil {
		b.err = io.EOF
		b.is.finish(nil)
	} else {
		b.err = err
		b.is.finish(grpcstatus.Error(codes.Aborted, "response failed"))
	}
	b.stopWatch()
}

// Close implements io.Closer. Closing before the end cancels the call,
// which also interrupts a Read blocked in another goroutine; after the end
// the cancellation is a no-op (the call finished already).
func (b *responseBody) Close() error {
	b.closeOnce.Do(func() {
		b.closed.Store(true)
		b.is.finish(grpcstatus.Error(codes.Canceled, "response body closed before its end"))
		b.stopWatch()
		b.release()
	})
	return nil
}
