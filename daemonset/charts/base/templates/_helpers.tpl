{{/* The labels every object of the mesh's charts carries. Call with (dict "root" $ "app" NAME). */}}
{{- define "base.labels" -}}
app: {{ .app }}
app.kubernetes.io/name: {{ .app }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Values.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}
