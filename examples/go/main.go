// A Go client of diffmesh.v1.Orchestrator, with code generated from protos/ by protoc-gen-go and
// protoc-gen-go-grpc (see build.sh). It calls Generate and GenerateStream (with progress), shows
// a deadline and a rejected request with its structured error details, and prints one JSON
// object with what it saw.
//
//	./build.sh && bin/diffmesh-go-client -address 127.0.0.1:50051 -model tiny-sd15 [-out DIR]
//	    [-stream-size 1152] [-max-receive-mb 4] [-timeout 2m]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	diffmeshv1 "github.com/diffmesh/diffmesh/gen/go/diffmesh/v1"
)

type imageSummary struct {
	Index    int32  `json:"index"`
	Seed     int64  `json:"seed"`
	MimeType string `json:"mime_type"`
	Width    int32  `json:"width"`
	Height   int32  `json:"height"`
	Bytes    int    `json:"bytes"`
}

type stepSummary struct {
	Step       int32  `json:"step"`
	TotalSteps int32  `json:"total_steps"`
	Phase      string `json:"phase"`
}

type violation struct {
	Field       string `json:"field"`
	Description string `json:"description"`
}

type errorInfo struct {
	Domain   string            `json:"domain"`
	Reason   string            `json:"reason"`
	Metadata map[string]string `json:"metadata"`
}

// failure is a call that failed as expected: its status and the structured details the server
// put in the grpc-status-details-bin trailer (google.rpc.Status), which grpc-go decodes.
type failure struct {
	Code       string      `json:"code"`
	Message    string      `json:"message"`
	Violations []violation `json:"violations"`
	ErrorInfo  []errorInfo `json:"error_info"`
}

func expectFailure(err error) (*failure, error) {
	if err == nil {
		return nil, errors.New("the call was expected to fail but succeeded")
	}
	st, ok := status.FromError(err)
	if !ok {
		return nil, err
	}
	found := &failure{Code: codeName(st.Code().String()), Message: st.Message(),
		Violations: []violation{}, ErrorInfo: []errorInfo{}}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				found.Violations = append(found.Violations, violation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.ErrorInfo:
			found.ErrorInfo = append(found.ErrorInfo, errorInfo{Domain: d.GetDomain(), Reason: d.GetReason(), Metadata: d.GetMetadata()})
		case error: // a detail whose type this program does not link in
			return nil, fmt.Errorf("undecodable error detail: %w", d)
		}
	}
	return found, nil
}

// codeName turns grpc-go's "InvalidArgument" into the canonical "INVALID_ARGUMENT".
func codeName(camel string) string {
	var b strings.Builder
	for i, r := range camel {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}

func summarize(images []*diffmeshv1.GeneratedImage, outDir, stem string) ([]imageSummary, error) {
	out := []imageSummary{}
	for _, generated := range images {
		image := generated.GetImage()
		if outDir != "" {
			extension := strings.TrimPrefix(image.GetMimeType(), "image/")
			name := filepath.Join(outDir, fmt.Sprintf("%s-%d.%s", stem, generated.GetIndex(), extension))
			if err := os.WriteFile(name, image.GetData(), 0o644); err != nil {
				return nil, err
			}
		}
		out = append(out, imageSummary{Index: generated.GetIndex(), Seed: generated.GetSeed(),
			MimeType: image.GetMimeType(), Width: image.GetWidth(), Height: image.GetHeight(), Bytes: len(image.GetData())})
	}
	return out, nil
}

func request(model, prompt string, width, height, steps int32) *diffmeshv1.GenerateRequest {
	return &diffmeshv1.GenerateRequest{Prompt: prompt, Model: model, Scheduler: "euler",
		Width: proto.Int32(width), Height: proto.Int32(height), Steps: proto.Int32(steps)}
}

func run() error {
	address := flag.String("address", "127.0.0.1:50051", "the orchestrator's host:port")
	model := flag.String("model", "", "model id (empty: the mesh's default)")
	outDir := flag.String("out", "", "directory to write the images to (optional)")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline of each call")
	maxReceiveMB := flag.Int("max-receive-mb", 4, "largest reply accepted, MiB (the orchestrator's max_unary_reply_mb)")
	streamSize := flag.Int("stream-size", 64, "width and height of the streamed image")
	flag.Parse()
	if *outDir != "" {
		if err := os.MkdirAll(*outDir, 0o755); err != nil {
			return err
		}
	}

	// The largest reply this client accepts. The orchestrator keeps every message within its
	// max_unary_reply_mb (default 4 MiB, what stock clients accept): GenerateStream sends images in
	// chunks of at most 3 MiB, and a unary Generate whose reply could be larger fails up front
	// with FAILED_PRECONDITION. Keep this equal to the deployment's max_unary_reply_mb; a client
	// limit below the server's makes the client drop replies as RESOURCE_EXHAUSTED, which the
	// contract otherwise uses for "at capacity, retry".
	conn, err := grpc.Dial(*address, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(*maxReceiveMB<<20)))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := diffmeshv1.NewOrchestratorClient(conn)

	// Unary: two images, image i uses seed + i.
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	unaryRequest := request(*model, "a lighthouse at dusk", 64, 64, 2)
	unaryRequest.Seed, unaryRequest.Count = proto.Int64(7), proto.Int32(2)
	unary, err := client.Generate(ctx, unaryRequest)
	if err != nil {
		return fmt.Errorf("Generate: %w", err)
	}
	unaryImages, err := summarize(unary.GetImages(), *outDir, "generate")
	if err != nil {
		return err
	}
	stages := []string{}
	for _, timing := range unary.GetInfo().GetTimings() {
		stages = append(stages, timing.GetStage())
	}

	// Streaming: a progress event per denoising step, then each image as `image` chunk events
	// (consecutive, in order; the one with last = true completes the file), then the result
	// with the info.
	streamRequest := request(*model, "a lighthouse", int32(*streamSize), int32(*streamSize), 3)
	streamRequest.Seed = proto.Int64(11)
	stream, err := client.GenerateStream(ctx, streamRequest)
	if err != nil {
		return fmt.Errorf("GenerateStream: %w", err)
	}
	progress := []stepSummary{}
	images := []*diffmeshv1.GeneratedImage{}
	var file []byte
	chunks := 0
	var result *diffmeshv1.GenerateResponse
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("GenerateStream: %w", err)
		}
		switch e := event.GetEvent().(type) {
		case *diffmeshv1.GenerateEvent_Progress:
			p := e.Progress
			progress = append(progress, stepSummary{Step: p.GetStep(), TotalSteps: p.GetTotalSteps(), Phase: p.GetPhase()})
			fmt.Fprintf(os.Stderr, "\r%s step %d/%d", p.GetPhase(), p.GetStep(), p.GetTotalSteps())
		case *diffmeshv1.GenerateEvent_Image:
			chunk := e.Image
			chunks++
			if chunk.GetOffset() != int64(len(file)) {
				return fmt.Errorf("image %d: chunk %d at offset %d, expected %d", chunk.GetIndex(), chunk.GetChunk(),
					chunk.GetOffset(), len(file))
			}
			file = append(file, chunk.GetData()...)
			if chunk.GetLast() {
				if int64(len(file)) != chunk.GetFileSize() {
					return fmt.Errorf("image %d: %d bytes, file_size says %d", chunk.GetIndex(), len(file), chunk.GetFileSize())
				}
				images = append(images, &diffmeshv1.GeneratedImage{Index: chunk.GetIndex(), Seed: chunk.GetSeed(),
					Image: &diffmeshv1.EncodedImage{Data: file, MimeType: chunk.GetMimeType(), Width: chunk.GetWidth(),
						Height: chunk.GetHeight()}})
				file = nil
			}
		case *diffmeshv1.GenerateEvent_Result:
			result = e.Result
		}
	}
	fmt.Fprintln(os.Stderr)
	if result == nil {
		return errors.New("GenerateStream ended without a result")
	}
	if len(images) == 0 { // a server from before image events sent the images inside the result
		images = result.GetImages()
	}
	streamImages, err := summarize(images, *outDir, "stream")
	if err != nil {
		return err
	}

	// A rejected request: INVALID_ARGUMENT with a google.rpc.BadRequest naming the field.
	_, err = client.Generate(ctx, request(*model, "a lighthouse", 100, 64, 2))
	badRequest, err := expectFailure(err)
	if err != nil {
		return fmt.Errorf("bad request: %w", err)
	}

	// A deadline shorter than the work: DEADLINE_EXCEEDED (the mesh stops the denoiser too).
	short, cancelShort := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancelShort()
	longRequest := request(*model, "a long job", 256, 256, 150)
	longRequest.Seed = proto.Int64(1)
	_, err = client.Generate(short, longRequest)
	deadline, err := expectFailure(err)
	if err != nil {
		return fmt.Errorf("deadline: %w", err)
	}

	report := map[string]interface{}{
		"generate": map[string]interface{}{"images": unaryImages, "model": unary.GetInfo().GetModel(),
			"steps": unary.GetInfo().GetSteps(), "request_id": unary.GetInfo().GetRequestId(), "stages": stages},
		"stream": map[string]interface{}{"progress": progress, "chunks": chunks, "images": streamImages,
			"model": result.GetInfo().GetModel(), "steps": result.GetInfo().GetSteps()},
		"bad_request": badRequest,
		"deadline":    deadline,
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	return encoder.Encode(report)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "diffmesh example failed:", err)
		os.Exit(1)
	}
}
